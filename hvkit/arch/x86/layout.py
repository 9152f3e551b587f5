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
KERNEL_LOAD_ADDR = 0x10_0000
HIMEM_START = 0x10_0000

# 32-bit PCI hole and the local/IO APIC: no RAM here.
MMIO_HOLE_START = 0xC000_0000
MMIO_HOLE_END = 0x1_0000_0000
IOAPIC_ADDR = 0xFEC0_0000
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
