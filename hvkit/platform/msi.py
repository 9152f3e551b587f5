"""MSI delivery through KVM, for device models that raise MSI/MSI-X."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hvkit.kvm.vm import Vm


class KvmMsi:
    """An MsiSender (hvkit.devices.pci.msix) that injects through
    KVM_SIGNAL_MSI, so the device model itself never calls KVM."""

    def __init__(self, vm: "Vm") -> None:
        self.vm = vm

    def signal_msi(self, address: int, data: int) -> None:
        self.vm.signal_msi(address, data)
