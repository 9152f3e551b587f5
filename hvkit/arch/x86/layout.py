"""Fixed guest-physical addresses and I/O ports of an hvkit x86 microVM.

One place for them, so loaders, devices and guests agree. The low 1 MiB
holds the VMM's boot structures; guests load at 1 MiB.
"""

GDT_ADDR = 0x500
GDT_ENTRIES = 4
BOOT_IDT_ADDR = 0x520
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000            # four page directories: identity map of 4 GiB
PD_COUNT = 4
GUEST_ARGS_ADDR = 0x8000    # NUL-terminated argument string of freestanding guests
GUEST_ARGS_MAX = 0x1000
BOOT_STACK_TOP = 0x8_0000   # per-vCPU boot stacks grow down from here, 16 KiB each
BOOT_STACK_SIZE = 0x4000
HIMEM_START = 0x10_0000

# 32-bit PCI hole and the local/IO APIC: no RAM here.
MMIO_HOLE_START = 0xC000_0000
MMIO_HOLE_END = 0x1_0000_0000
IOAPIC_ADDR = 0xFEC0_0000

# virtio-mmio windows, one 4 KiB page per device from the base, each on its
# own edge-triggered ISA pin of the IOAPIC (declared to Linux on the command
# line). PCI BARs are placed below the base (0xC000_0000-0xD000_0000), PCI
# INTx uses pins 16-23; the pins here are the ISA ones no hvkit or Linux
# platform device claims (not 0 timer, 1 keyboard, 3/4 serial, 8 RTC,
# 12 mouse).
VIRTIO_MMIO_BASE = 0xD000_0000
VIRTIO_MMIO_SIZE = 0x1000
VIRTIO_MMIO_IRQS = (5, 6, 7, 9, 10, 11, 14, 15)
VIRTIO_MMIO_END = VIRTIO_MMIO_BASE + VIRTIO_MMIO_SIZE * len(VIRTIO_MMIO_IRQS)
LAPIC_ADDR = 0xFEE0_0000

# I/O ports
COM1_PORT = 0x3F8
COM1_IRQ = 4
I8042_DATA_PORT = 0x60
I8042_CMD_PORT = 0x64
RTC_PORT = 0x70
POST_PORT = 0x80            # Linux's I/O delay port: served natively and ignored
EXIT_PORT = 0x500           # a 32-bit write stops the VM with that exit code
HYPERCALL_PORT = 0x510      # a 32-bit write of a hypercall block's address
