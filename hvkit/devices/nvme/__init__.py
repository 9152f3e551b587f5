"""NVMe controller with queues in shared guest memory.

``NvmeController`` is the PCI function (control plane in the VMM);
``QueueEngine`` serves rings in place; ``Accelerator`` runs the engine in a
separate process woken by an eventfd and signalling interrupts by eventfd.
"""
from hvkit.devices.nvme.controller import NvmeController
from hvkit.devices.nvme.engine import QueueEngine
from hvkit.devices.nvme.namespace import Namespace

__all__ = ["Namespace", "NvmeController", "QueueEngine"]
