"""NVMe controller with queues in shared guest memory.

``NvmeController`` is the PCI function (control plane in the VMM);
``QueueEngine`` serves rings in place; ``Accelerator`` runs the engine in a
separate process woken by an eventfd and signalling interrupts by eventfd.

Wiring it into a machine (nothing here calls KVM):

    ctrl = NvmeController(mem, [RawFileBackend(path)], msi=msi_sender)
    pci.add(ctrl); BarAllocator().assign(pci)     # BAR0 regs+doorbells, BAR4 MSI-X
    for bar in ctrl.bars: mmio_bus.register(bar.mapped_at, bar.size, bar.region)
    pci.add_bar_listener(remap)                    # (device, bar, old, new)
    ctrl.attach_intx(line, irq)                    # INTx when MSI-X is off
    ctrl.msix.add_listener(update_gsi_routes)      # ctrl.msix.vector(i) -> address, data, masked

Mode a: that is all; every doorbell write is an MMIO exit into ``ctrl.write``.
Modes b/c: ``acc = ctrl.use_accelerator()`` before the guest enables the
controller; register KVM irqfds on ``acc.irq_fds[v]`` for each MSI-X
vector's GSI, and, when ``ctrl.dbbuf_listeners`` reports a doorbell buffer,
KVM ioeventfds on ``ctrl.ioeventfd_doorbells()`` all signalling
``acc.kick_fd`` (remove them when it reports ``None``). Watch ``acc.pidfd``
and call ``acc.restart()`` when it becomes readable.
"""
from hvkit.devices.nvme.controller import NvmeController
from hvkit.devices.nvme.engine import QueueEngine
from hvkit.devices.nvme.namespace import Namespace

__all__ = ["Namespace", "NvmeController", "QueueEngine"]
