"""MSI delivery through KVM, for device models that raise MSI/MSI-X."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hvkit.kvm.vm import Vm


class KvmMsi:
    """An MsiSender (hvkit.devices.pci.msix) that injects through
    KVM_SIGNAL_MSI, so the device model itself never calls KVM."""

    def __init__(self, vm: "Vm") -> None:
        self.vm = vm

    def signal_msi(self, address: int, data: int) -> None:
        self.vm.signal_msi(address, data)


class MsixIrqfds:
    """The GSI routes and irqfds of a device's MSI-X vectors.

    An unmasked vector gets a route and an irqfd, so KVM delivers the
    device's eventfd itself; a masked one is taken off, so the device model
    sees the signal and sets the pending bit. ``on`` lists the vectors KVM
    delivers; ``gsis`` maps vectors (or pins) to their GSI."""

    def __init__(self) -> None:
        self.gsis: dict[int, int] = {}
        self.on: set[int] = set()

    def sync(self, vm: "Vm", index: int, vector: Any, fd: int) -> None:
        """Follow one vector's mask, address and data."""
        if vector.masked:
            if index in self.on:
                vm.irqfd(fd, self.gsis[index], deassign=True)
                self.on.discard(index)
            return
        self.gsis[index] = vm.add_msi_route(vector.address, vector.data, self.gsis.get(index))
        if index not in self.on:
            vm.irqfd(fd, self.gsis[index])
            self.on.add(index)
