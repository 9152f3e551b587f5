"""Linux bzImage through the x86 64-bit boot protocol.

The VMM does what a boot loader does (Documentation/arch/x86/boot.rst):
reads the setup header at 0x1f1, copies the protected-mode kernel to
``code32_start``, builds the "zero page" (``struct boot_params``) with the
e820 map, the command line and the initrd, and enters the kernel in 64-bit
mode at load address + 0x200 with RSI pointing at the zero page. The real-mode
setup code is never run, which is why protocol 2.12 (the 64-bit entry and
``xloadflags``) is the minimum.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from hvkit.boot import layout
from hvkit.boot.cmdline import write_cmdline
from hvkit.boot.linux import (E820_RAM, LinuxBoot, check_e820, default_e820,
                              place_initrd, read_kernel)
from hvkit.errors import GuestLoadError, GuestMemoryError

if TYPE_CHECKING:
    from hvkit.memory.guest import GuestMemory

# Offsets in the file and in the zero page (the setup header is at the same
# place in both).
OFF_SETUP_SECTS = 0x1F1
OFF_VID_MODE = 0x1FA
OFF_BOOT_FLAG = 0x1FE
OFF_JUMP = 0x200
OFF_HEADER = 0x202
OFF_VERSION = 0x206
OFF_KERNEL_VERSION = 0x20E
OFF_TYPE_OF_LOADER = 0x210
OFF_LOADFLAGS = 0x211
OFF_CODE32_START = 0x214
OFF_RAMDISK_IMAGE = 0x218
OFF_RAMDISK_SIZE = 0x21C
OFF_HEAP_END_PTR = 0x224
OFF_CMD_LINE_PTR = 0x228
OFF_INITRD_ADDR_MAX = 0x22C
OFF_KERNEL_ALIGNMENT = 0x230
OFF_RELOCATABLE = 0x234
OFF_XLOADFLAGS = 0x236
OFF_CMDLINE_SIZE = 0x238
OFF_PAYLOAD_OFFSET = 0x248
OFF_PAYLOAD_LENGTH = 0x24C
OFF_SETUP_DATA = 0x250
OFF_PREF_ADDRESS = 0x258
OFF_INIT_SIZE = 0x260
SETUP_HEADER_END = 0x26C        # end of the header as of protocol 2.15

# boot_params fields outside the setup header
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_SENTINEL = 0x1EF
BP_E820_TABLE = 0x2D0
E820_MAX_ENTRIES_ZEROPAGE = 128
E820_ENTRY = struct.Struct("<QQI")

HDRS_MAGIC = b"HdrS"
BOOT_FLAG = 0xAA55
MIN_VERSION = 0x020C            # 2.12: 64-bit entry point, xloadflags

LOADED_HIGH = 1 << 0
QUIET_FLAG = 1 << 5
KEEP_SEGMENTS = 1 << 6
CAN_USE_HEAP = 1 << 7
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1

TYPE_OF_LOADER_UNDEFINED = 0xFF  # "no registered loader ID"
ENTRY64_OFFSET = 0x200
OLD_CMDLINE_MAX = 256           # before protocol 2.06 (incl. the NUL)
DEFAULT_INITRD_ADDR_MAX = 0x37FFFFFF


@dataclass(frozen=True)
class SetupHeader:
    """The fields of a bzImage's setup header that a 64-bit loader needs."""

    version: int
    setup_sects: int
    loadflags: int
    xloadflags: int
    code32_start: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable: bool
    cmdline_size: int
    payload_offset: int
    payload_length: int
    pref_address: int
    init_size: int
    header_end: int          # file offset one past the setup header
    kernel_version: str      # e.g. "6.1.0-56-cloud-amd64 (...) #1 SMP ..."

    @property
    def setup_size(self) -> int:
        """Bytes of real-mode code (boot sector included) before the
        protected-mode kernel in the file."""
        return (self.setup_sects + 1) * 512

    @property
    def version_str(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF}"


def parse_setup_header(data: bytes, name: str = "bzImage") -> SetupHeader:
    """Read and check a bzImage's setup header; raise GuestLoadError naming
    what is wrong with an image hvkit cannot boot."""
    if len(data) < OFF_VERSION + 2:
        raise GuestLoadError(f"{name}: {len(data)} bytes is too short for a bzImage "
                             f"(the setup header ends at {OFF_VERSION + 2:#x})")
    if data[:4] == b"\x7fELF":
        raise GuestLoadError(f"{name}: is an ELF file (vmlinux), not a bzImage; "
                             f"boot it through PVH")
    magic = data[OFF_HEADER:OFF_HEADER + 4]
    if magic != HDRS_MAGIC:
        raise GuestLoadError(f"{name}: no Linux setup header: bytes at {OFF_HEADER:#x} are "
                             f"{magic!r}, not {HDRS_MAGIC!r}")
    boot_flag, = struct.unpack_from("<H", data, OFF_BOOT_FLAG)
    if boot_flag != BOOT_FLAG:
        raise GuestLoadError(f"{name}: boot_flag is {boot_flag:#06x}, not {BOOT_FLAG:#06x}")
    version, = struct.unpack_from("<H", data, OFF_VERSION)
    if version < MIN_VERSION:
        raise GuestLoadError(
            f"{name}: boot protocol {version >> 8}.{version & 0xFF} is too old; the 64-bit "
            f"entry needs 2.12 or later (Linux 3.8+)")
    header_end = OFF_HEADER + data[OFF_JUMP + 1]
    if header_end > 0x290:
        raise GuestLoadError(f"{name}: setup header claims to end at {header_end:#x}, past "
                             f"its room in boot_params (0x290)")
    if header_end < OFF_XLOADFLAGS + 2 or len(data) < max(header_end, OFF_CMDLINE_SIZE + 4):
        raise GuestLoadError(f"{name}: setup header is truncated (ends at {header_end:#x})")
    # Fields past the header's declared end read as zero.
    hdr = bytearray(data[:max(header_end, SETUP_HEADER_END)])
    hdr[header_end:] = bytes(len(hdr) - header_end)

    def u8(off: int) -> int:
        return hdr[off]

    def u32(off: int) -> int:
        return struct.unpack_from("<I", hdr, off)[0]

    def u64(off: int) -> int:
        return struct.unpack_from("<Q", hdr, off)[0]

    setup_sects = u8(OFF_SETUP_SECTS) or 4
    loadflags = u8(OFF_LOADFLAGS)
    xloadflags = struct.unpack_from("<H", hdr, OFF_XLOADFLAGS)[0]
    if not loadflags & LOADED_HIGH:
        raise GuestLoadError(f"{name}: a zImage (protected-mode code loaded at 0x10000); "
                             f"only bzImage (LOADED_HIGH) kernels are supported")
    if not xloadflags & XLF_KERNEL_64:
        raise GuestLoadError(f"{name}: xloadflags {xloadflags:#x} lack XLF_KERNEL_64: not a "
                             f"64-bit kernel, or it has no 64-bit entry point")
    setup_size = (setup_sects + 1) * 512
    if len(data) <= setup_size:
        raise GuestLoadError(f"{name}: file is {len(data)} bytes but the setup code alone "
                             f"takes {setup_size} ({setup_sects} setup sectors)")
    kver_ptr, = struct.unpack_from("<H", hdr, OFF_KERNEL_VERSION)
    kernel_version = ""
    if kver_ptr and kver_ptr + 0x200 < len(data):
        raw = data[kver_ptr + 0x200:kver_ptr + 0x200 + 256]
        kernel_version = raw.split(b"\0", 1)[0].decode("ascii", "replace")
    pref_address = u64(OFF_PREF_ADDRESS)
    return SetupHeader(
        version=version,
        setup_sects=setup_sects,
        loadflags=loadflags,
        xloadflags=xloadflags,
        code32_start=u32(OFF_CODE32_START),
        initrd_addr_max=u32(OFF_INITRD_ADDR_MAX) or DEFAULT_INITRD_ADDR_MAX,
        kernel_alignment=u32(OFF_KERNEL_ALIGNMENT),
        relocatable=bool(u8(OFF_RELOCATABLE)),
        cmdline_size=u32(OFF_CMDLINE_SIZE) or (OLD_CMDLINE_MAX - 1),
        payload_offset=u32(OFF_PAYLOAD_OFFSET),
        payload_length=u32(OFF_PAYLOAD_LENGTH),
        pref_address=pref_address,
        init_size=u32(OFF_INIT_SIZE),
        header_end=header_end,
        kernel_version=kernel_version,
    )


def is_bzimage(data: bytes) -> bool:
    """True when ``data`` starts like a Linux boot-protocol image."""
    return len(data) > OFF_HEADER + 4 and data[OFF_HEADER:OFF_HEADER + 4] == HDRS_MAGIC


def build_zero_page(data: bytes, hdr: SetupHeader, *, load_addr: int, cmdline_addr: int,
                    initrd_addr: int, initrd_size: int,
                    e820: Sequence[tuple[int, int, int]]) -> bytes:
    """The 4 KiB ``boot_params`` for a kernel loaded at ``load_addr``.

    Starts from zeros plus the image's own setup header, as boot.rst asks,
    then fills in what the loader decides.
    """
    if len(e820) > E820_MAX_ENTRIES_ZEROPAGE:
        raise GuestLoadError(f"e820 map has {len(e820)} entries; the zero page holds at "
                             f"most {E820_MAX_ENTRIES_ZEROPAGE}")
    zp = bytearray(layout.ZERO_PAGE_SIZE)
    zp[OFF_SETUP_SECTS:hdr.header_end] = data[OFF_SETUP_SECTS:hdr.header_end]
    struct.pack_into("<H", zp, OFF_VID_MODE, 0xFFFF)               # "normal" video mode
    zp[OFF_TYPE_OF_LOADER] = TYPE_OF_LOADER_UNDEFINED
    # No real-mode setup runs, so its heap and segment rules do not apply.
    zp[OFF_LOADFLAGS] = (hdr.loadflags | LOADED_HIGH) & ~(CAN_USE_HEAP | KEEP_SEGMENTS) & 0xFF
    struct.pack_into("<I", zp, OFF_CODE32_START, load_addr)
    struct.pack_into("<I", zp, OFF_RAMDISK_IMAGE, initrd_addr & 0xFFFFFFFF)
    struct.pack_into("<I", zp, OFF_RAMDISK_SIZE, initrd_size & 0xFFFFFFFF)
    struct.pack_into("<I", zp, BP_EXT_RAMDISK_IMAGE, initrd_addr >> 32)
    struct.pack_into("<I", zp, BP_EXT_RAMDISK_SIZE, initrd_size >> 32)
    struct.pack_into("<I", zp, OFF_CMD_LINE_PTR, cmdline_addr & 0xFFFFFFFF)
    struct.pack_into("<I", zp, BP_EXT_CMD_LINE_PTR, cmdline_addr >> 32)
    struct.pack_into("<Q", zp, OFF_SETUP_DATA, 0)
    zp[BP_SENTINEL] = 0
    zp[BP_E820_ENTRIES] = len(e820)
    for i, (addr, size, kind) in enumerate(e820):
        E820_ENTRY.pack_into(zp, BP_E820_TABLE + i * E820_ENTRY.size, addr, size, kind)
    return bytes(zp)


def choose_load_addr(hdr: SetupHeader) -> int:
    """Where the protected-mode kernel goes.

    A relocatable kernel is put at its ``pref_address`` (16 MiB for x86-64)
    so that its decompressor need not move itself; any other kernel at
    ``code32_start`` (1 MiB), where it expects to be.
    """
    if hdr.relocatable and hdr.pref_address:
        align = hdr.kernel_alignment or 0x200000
        return (hdr.pref_address + align - 1) // align * align
    return hdr.code32_start or layout.BZIMAGE_LOAD_ADDR


def load_bzimage(memory: "GuestMemory", kernel: bytes | str | os.PathLike, cmdline: str,
                 initrd: bytes | None = None,
                 e820: Sequence[tuple[int, int, int]] | None = None, *,
                 name: str | None = None) -> LinuxBoot:
    """Load a bzImage, its command line and initrd into ``memory``.

    Returns how to start the boot vCPU: 64-bit mode with identity-mapped
    page tables, ``rip = load address + 0x200``, ``rsi`` = the zero page.
    Nothing is written unless everything fits, so a failed load leaves no
    half-built guest behind it.
    """
    data, default_name = read_kernel(kernel)
    name = name or default_name
    hdr = parse_setup_header(data, name)
    if e820 is None:
        e820 = default_e820(memory)
    check_e820(memory, e820)
    protected = memoryview(data)[hdr.setup_size:]
    load_addr = choose_load_addr(hdr)
    # The decompressor needs init_size bytes from where it decompresses to:
    # the load address or pref_address (LOAD_PHYSICAL_ADDR), whichever is
    # higher; a non-relocatable kernel loaded at 1 MiB still runs at 16 MiB.
    run_addr = max(load_addr, hdr.pref_address)
    kernel_end = max(load_addr + len(protected), run_addr + hdr.init_size)
    if not memory.contains(load_addr, kernel_end - load_addr):
        raise GuestLoadError(
            f"{name}: the kernel needs guest RAM from {load_addr:#x} to {kernel_end:#x} "
            f"({kernel_end / (1 << 20):.1f} MiB, init_size {hdr.init_size:#x}) but RAM "
            f"ends at {memory.end:#x}")
    if not _in_ram_e820(e820, load_addr, kernel_end - load_addr):
        raise GuestLoadError(f"{name}: [{load_addr:#x}, {kernel_end:#x}) is not usable RAM "
                             f"in the e820 map")
    if hdr.version >= 0x0206:
        max_cmdline = min(hdr.cmdline_size + 1, layout.CMDLINE_MAX)
    else:
        max_cmdline = OLD_CMDLINE_MAX
    initrd_addr = initrd_size = 0
    if initrd:
        limit = min(hdr.initrd_addr_max + 1, layout.LOW_4G)
        initrd_addr = place_initrd(e820, len(initrd), low=kernel_end, limit=limit, name=name)
        initrd_size = len(initrd)
    zero_page = build_zero_page(data, hdr, load_addr=load_addr,
                                cmdline_addr=layout.CMDLINE_ADDR,
                                initrd_addr=initrd_addr, initrd_size=initrd_size, e820=e820)
    try:
        write_cmdline(memory, layout.CMDLINE_ADDR, cmdline, max_cmdline)
        memory.write(load_addr, protected)
        if initrd:
            memory.write(initrd_addr, initrd)
        memory.write(layout.ZERO_PAGE_ADDR, zero_page)
    except GuestMemoryError as exc:
        raise GuestLoadError(f"{name}: {exc}") from exc
    entry = load_addr + ENTRY64_OFFSET
    return LinuxBoot(
        mode="long64", entry=entry, kernel_start=load_addr, kernel_end=kernel_end,
        boot_params_addr=layout.ZERO_PAGE_ADDR, cmdline_addr=layout.CMDLINE_ADDR,
        cmdline=cmdline, initrd_addr=initrd_addr, initrd_size=initrd_size,
        regs={"rip": entry, "rsi": layout.ZERO_PAGE_ADDR},
        kernel_version=hdr.kernel_version, protocol=hdr.version_str)


def _in_ram_e820(e820: Sequence[tuple[int, int, int]], addr: int, size: int) -> bool:
    return any(kind == E820_RAM and start <= addr and addr + size <= start + length
               for start, length, kind in e820)
