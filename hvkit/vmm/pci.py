"""PCI for a microVM: bus 0, BAR placement, INTx routing and BAR moves.

A microVM has no firmware to place BARs, so hvkit places them and keeps
the VM's buses in step when the guest moves them. INTx of slot s goes to
IOAPIC pin 16 + s % 8 (listed in the MP table); MSI-X goes through KVM.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from hvkit.arch.x86 import layout
from hvkit.devices.irq import CallbackLine
from hvkit.devices.pci import constants as PCI
from hvkit.devices.pci.bar import BarAllocator
from hvkit.devices.pci.bus import PciBus
from hvkit.devices.pci.config_io import PciConfigIo
from hvkit.devices.pci.host_bridge import PciHostBridge

if TYPE_CHECKING:
    from hvkit.devices.pci.device import PciDevice
    from hvkit.vmm.runtime import Vmm

#: IOAPIC pins 16-23 carry PCI INTx, by slot
INTX_GSI_BASE = 16
INTX_PINS = 8


def intx_gsi(devfn: int) -> int:
    """The IOAPIC pin a function's INTx is wired to."""
    return INTX_GSI_BASE + (devfn >> 3) % INTX_PINS


class PciPlatform:
    """Bus 0 with its host bridge and config ports, on one VM."""

    def __init__(self, vmm: "Vmm") -> None:
        self.vmm = vmm
        self.bus = PciBus()
        self.bus.add_bar_listener(self._bar_moved)
        self.bus.add(PciHostBridge(), 0)
        vmm.add_device(vmm.io_bus, PCI.CONFIG_IO_PORT_BASE, PCI.CONFIG_IO_PORT_LEN,
                       PciConfigIo(self.bus), "pci-config")
        # BARs stay below the virtio-mmio windows (hvkit.arch.x86.layout)
        self.bars = BarAllocator(mmio_end=layout.VIRTIO_MMIO_BASE)
        #: (slot, pin, GSI) per function, for the MP table
        self.irqs: list[tuple[int, int, int]] = []

    def add(self, device: "PciDevice", slot: int | None = None) -> int:
        devfn = self.bus.add(device, slot)
        gsi = intx_gsi(devfn)
        vm = self.vmm.vm
        device.attach_intx(CallbackLine(lambda level: vm.irq_line(gsi, level)), gsi)
        self.irqs.append((devfn >> 3, 0, gsi))
        self.bars.assign([device])
        return devfn

    def _bar_moved(self, device: "PciDevice", index: int, old: int | None,
                   new: int | None) -> None:
        bar = device.bars[index]
        bus = self.vmm.io_bus if bar.is_io else self.vmm.mmio_bus
        if old is not None:
            bus.unregister(bar.region, old)
        if new is not None:
            bus.register(new, bar.size, bar.region, f"{device.name}.{bar.name}")
        for listener in list(self.vmm.bar_listeners):
            listener(device, index, old, new)
