"""The VMM in three parts, as Firecracker's VmResources -> builder -> Vmm:

- ``config``: ``VmConfig``, a plain, validated description (JSON in and out);
- ``builder``: ``build(config)``, one function per concern;
- ``runtime``: ``Vmm``, the vCPU threads, exit dispatch and lifecycle;

and ``attach.Attachment``, the one interface for devices and services that
live with a VM. ``hvkit.MicroVM`` is the front door over all of it.
"""
from hvkit.vmm.attach import Attachment
from hvkit.vmm.config import EntryState, PortMap, VmConfig, check_timeout

__all__ = ["Attachment", "EntryState", "PortMap", "VmConfig", "Vmm", "build",
           "check_timeout"]


def __getattr__(name: str):
    # The runtime and builder pull in the native layer; import them when asked.
    if name == "Vmm":
        from hvkit.vmm.runtime import Vmm
        return Vmm
    if name == "build":
        from hvkit.vmm.builder import build
        return build
    raise AttributeError(name)
