"""PCI: configuration space, BARs, capabilities, MSI-X, a host bridge.

Nothing here knows KVM. The machine registers ``PciConfigIo`` on the port
bus (0xCF8) and optionally ``PciEcam`` on the MMIO bus, places BARs with
``BarAllocator``, and listens to ``PciBus.add_bar_listener`` to remap the
MMIO bus (and ioeventfds) when the guest moves a BAR.
"""
from hvkit.devices.pci.bar import Bar, BarAllocator, BarKind
from hvkit.devices.pci.bus import PciBus
from hvkit.devices.pci.config import ConfigSpace
from hvkit.devices.pci.config_io import PciConfigIo
from hvkit.devices.pci.device import PciDevice
from hvkit.devices.pci.ecam import PciEcam
from hvkit.devices.pci.host_bridge import PciHostBridge
from hvkit.devices.pci.msix import MsixCapability, MsixVector

__all__ = ["Bar", "BarAllocator", "BarKind", "ConfigSpace", "MsixCapability",
           "MsixVector", "PciBus", "PciConfigIo", "PciDevice", "PciEcam",
           "PciHostBridge"]
