"""The VMM in three parts, as Firecracker's VmResources -> builder -> Vmm:

- ``config``: ``VmConfig``, a plain, validated description (JSON in and out);
- ``builder``: ``build(config)``, one function per concern;
- ``runtime``: ``Vmm``, the vCPU threads, exit dispatch and lifecycle;

and ``attach.Attachment``, the one interface for devices and services that
live with a VM. ``hvkit.MicroVM`` is the front door over all of it. The
builder and runtime load the native layer: import them from their modules
(``from hvkit.vmm.builder import build``).
"""
from hvkit.vmm.attach import Attachment
from hvkit.vmm.config import EntryState, PortMap, VmConfig, check_timeout

__all__ = ["Attachment", "EntryState", "PortMap", "VmConfig", "check_timeout"]
