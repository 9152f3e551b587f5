"""PCI constants and the guest-physical layout of PCI windows (one place)."""
from __future__ import annotations

# -- guest-physical layout --------------------------------------------------
#: 32-bit MMIO hole where BARs are placed (below the IOAPIC/LAPIC at 0xFEC00000).
PCI_MMIO_BASE = 0xC000_0000
PCI_MMIO_END = 0xFEC0_0000          # exclusive
#: Port-I/O window for I/O BARs.
PCI_IO_BASE = 0xC000
PCI_IO_END = 0x1_0000               # exclusive
#: Configuration mechanism #1 ports.
CONFIG_ADDRESS_PORT = 0xCF8
CONFIG_DATA_PORT = 0xCFC
CONFIG_IO_PORT_BASE = 0xCF8
CONFIG_IO_PORT_LEN = 8
#: ECAM (memory-mapped configuration), 1 MiB per bus; bus 0 only by default.
ECAM_BASE = 0xB000_0000
ECAM_BUS_SIZE = 1 << 20

# -- configuration-space registers (type 0 header) --------------------------
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_PROG = 0x09
CLASS_CODE = 0x09                    # prog-if, subclass, base class (3 bytes)
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
ROM_ADDRESS = 0x30
CAPABILITY_LIST = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D

CONFIG_SPACE_SIZE = 256
EXT_CONFIG_SPACE_SIZE = 4096

COMMAND_IO = 1 << 0
COMMAND_MEMORY = 1 << 1
COMMAND_MASTER = 1 << 2
COMMAND_PARITY = 1 << 6
COMMAND_SERR = 1 << 8
COMMAND_INTX_DISABLE = 1 << 10

STATUS_INTERRUPT = 1 << 3
STATUS_CAP_LIST = 1 << 4
#: write-1-to-clear error bits of the status register
STATUS_W1C = 0xF900

BAR_IO = 0x1
BAR_MEM_TYPE_64 = 0x4
BAR_MEM_PREFETCH = 0x8

CAP_ID_MSI = 0x05
CAP_ID_PCIE = 0x10
CAP_ID_MSIX = 0x11

HEADER_TYPE_NORMAL = 0x00

CLASS_BRIDGE_HOST = 0x060000
CLASS_STORAGE_NVME = 0x010802

#: Red Hat / QEMU virtual-device vendor ID space; hvkit's defaults.
VENDOR_REDHAT = 0x1B36
DEVICE_HOST_BRIDGE = 0x0008
DEVICE_NVME = 0x0010
