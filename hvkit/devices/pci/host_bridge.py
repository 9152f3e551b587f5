"""The host bridge at 00:00.0, which guests expect before any other device."""
from __future__ import annotations

from hvkit.devices.pci import constants as C
from hvkit.devices.pci.device import PciDevice


class PciHostBridge(PciDevice):
    """A function with no BARs and no interrupt that identifies the root
    complex (class 06/00/00) so that the guest's PCI scan starts."""

    def __init__(self, vendor_id: int = C.VENDOR_REDHAT,
                 device_id: int = C.DEVICE_HOST_BRIDGE) -> None:
        super().__init__(vendor_id, device_id, C.CLASS_BRIDGE_HOST,
                         interrupt_pin=0, name="pci-host-bridge")
        # A host bridge decodes memory and is a bus master by definition.
        self.config.set_u16(C.COMMAND, C.COMMAND_MEMORY | C.COMMAND_MASTER)
