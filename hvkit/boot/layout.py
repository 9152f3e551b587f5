"""Fixed guest-physical addresses the Linux loaders use.

They sit in the low 1 MiB next to the VMM's own boot structures
(``hvkit.arch.x86.layout``), which they must not overlap:

====================  =================  ===================================
range                 owner              what
====================  =================  ===================================
0x0500 - 0x051F       arch.x86.layout    GDT
0x0520 - 0x05FF       arch.x86.layout    boot IDT stub
0x6000 - 0x6FFF       this module        PVH ``hvm_start_info`` (0x6000),
                                         its module list (0x6040) and memory
                                         map (0x6080, up to 165 entries)
0x7000 - 0x7FFF       this module        Linux "zero page" (``boot_params``)
0x8000 - 0x8FFF       arch.x86.layout    freestanding guests' argument string
0x9000 - 0xEFFF       arch.x86.layout    identity page tables (4 GiB)
0x20000 - 0x2FFFF     this module        kernel command line (NUL-terminated)
below 0x80000         arch.x86.layout    per-vCPU boot stacks, growing down
0x9FC00 - 0xFFFFF     arch.x86.e820      MP table, legacy hole (reserved)
0x100000 -            this module        bzImage protected-mode code (or at
                                         the kernel's pref_address)
top of RAM < 4 GiB    this module        initrd, page aligned, as high as the
                                         kernel's initrd_addr_max allows
====================  =================  ===================================

A PVH kernel (ELF vmlinux) loads where its program headers say (16 MiB for
x86-64 Linux).
"""
from __future__ import annotations

START_INFO_ADDR = 0x6000
START_INFO_MODLIST_ADDR = 0x6040
START_INFO_MEMMAP_ADDR = 0x6080
START_INFO_END = 0x7000

ZERO_PAGE_ADDR = 0x7000
ZERO_PAGE_SIZE = 0x1000

CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000          # bytes, including the terminating NUL

BZIMAGE_LOAD_ADDR = 0x100000   # code32_start of a kernel loaded "high"
INITRD_ALIGN = 0x1000
LOW_4G = 1 << 32

LOADER_RANGES = (
    (START_INFO_ADDR, START_INFO_END, "PVH start_info, modlist, memmap"),
    (ZERO_PAGE_ADDR, ZERO_PAGE_ADDR + ZERO_PAGE_SIZE, "zero page"),
    (CMDLINE_ADDR, CMDLINE_ADDR + CMDLINE_MAX, "command line"),
)
