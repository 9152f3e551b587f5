"""Linux (or any PVH kernel) as an ELF vmlinux through the PVH entry point.

PVH is the x86/HVM direct boot ABI: the kernel names a 32-bit physical
entry point in an ELF note (owner "Xen", type XEN_ELFNOTE_PHYS32_ENTRY = 18);
the VMM copies the PT_LOAD segments to their physical addresses, builds an
``hvm_start_info`` with the command line, the initrd as module 0 and the
memory map, and starts the vCPU in 32-bit protected mode with paging off and
EBX pointing at the start info. There is no decompressor and no real-mode
code, which makes it the fastest way into a Linux kernel.
"""
from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from hvkit.boot import layout
from hvkit.boot.cmdline import write_cmdline
from hvkit.boot.elf import LoadSegment, check_entry, load_segments
from hvkit.boot.linux import (E820_RAM, LinuxBoot, check_e820, default_e820,
                              place_initrd, read_kernel)
from hvkit.errors import GuestLoadError, GuestMemoryError

if TYPE_CHECKING:
    from hvkit.memory.guest import GuestMemory

XEN_ELFNOTE_PHYS32_ENTRY = 18
XEN_NOTE_OWNER = "Xen"

HVM_START_MAGIC = 0x336EC578
HVM_START_VERSION = 1
# magic, version, flags, nr_modules, modlist_paddr, cmdline_paddr,
# rsdp_paddr, memmap_paddr, memmap_entries, reserved
START_INFO = struct.Struct("<IIIIQQQQII")
MODLIST_ENTRY = struct.Struct("<QQQQ")      # paddr, size, cmdline_paddr, reserved
MEMMAP_ENTRY = struct.Struct("<QQII")       # addr, size, type, reserved
MAX_MEMMAP_ENTRIES = (layout.START_INFO_END - layout.START_INFO_MEMMAP_ADDR) // MEMMAP_ENTRY.size


PvhSegment = LoadSegment


@dataclass(frozen=True)
class PvhImage:
    """An ELF kernel's PVH entry point and what to load where."""

    entry: int
    segments: tuple[PvhSegment, ...]

    @property
    def start(self) -> int:
        return min(s.paddr for s in self.segments)

    @property
    def end(self) -> int:
        return max(s.end for s in self.segments)


def find_pvh_entry(elf: ELFFile, name: str = "vmlinux") -> int:
    """The PHYS32_ENTRY address from the ELF's "Xen" notes (PT_NOTE segments,
    or .note sections when there are no program headers for them)."""
    found: list[int] = []

    def scan(notes) -> None:
        for note in notes:
            if note["n_name"] != XEN_NOTE_OWNER or note["n_type"] != XEN_ELFNOTE_PHYS32_ENTRY:
                continue
            desc = note["n_descdata"]
            if isinstance(desc, str):        # pyelftools decodes unknown notes as latin-1
                desc = desc.encode("latin-1")
            if len(desc) not in (4, 8):
                raise GuestLoadError(f"{name}: XEN_ELFNOTE_PHYS32_ENTRY has a {len(desc)}-byte "
                                     f"value; expected 4 or 8")
            found.append(int.from_bytes(desc, "little"))

    try:
        for seg in elf.iter_segments():
            if seg["p_type"] == "PT_NOTE":
                scan(seg.iter_notes())
        if not found:
            for sec in elf.iter_sections():
                if sec["sh_type"] == "SHT_NOTE":
                    scan(sec.iter_notes())
    except ELFError as exc:
        raise GuestLoadError(f"{name}: malformed ELF notes: {exc}") from None
    if not found:
        raise GuestLoadError(
            f"{name}: no PVH entry point (no 'Xen' note of type XEN_ELFNOTE_PHYS32_ENTRY=18); "
            f"build the kernel with CONFIG_PVH=y or boot its bzImage instead")
    entry = found[0]
    if entry >= layout.LOW_4G:
        raise GuestLoadError(f"{name}: PVH entry {entry:#x} is above 4 GiB; it must be a "
                             f"32-bit physical address")
    return entry


def parse_pvh(data: bytes, name: str = "vmlinux") -> PvhImage:
    """Check an ELF kernel and collect its PVH entry and load segments."""
    if data[:4] != b"\x7fELF":
        raise GuestLoadError(f"{name}: not an ELF file (first bytes {data[:4]!r})")
    try:
        elf = ELFFile(io.BytesIO(data))
        if elf["e_machine"] != "EM_X86_64":
            raise GuestLoadError(f"{name}: ELF for {elf['e_machine']}, not x86-64")
        if elf.elfclass != 64:
            raise GuestLoadError(f"{name}: {elf.elfclass}-bit ELF; expected ELFCLASS64")
        entry = find_pvh_entry(elf, name)
        segments = load_segments(elf, len(data), name)
    except ELFError as exc:
        raise GuestLoadError(f"{name}: malformed ELF: {exc}") from None
    check_entry(segments, entry, name, "PVH entry")
    return PvhImage(entry, tuple(segments))


def build_start_info(*, cmdline_addr: int, modules: Sequence[tuple[int, int]],
                     memmap: Sequence[tuple[int, int, int]]) -> tuple[bytes, bytes, bytes]:
    """(start_info, modlist, memmap) bytes for the fixed layout addresses.

    ``modules`` are (paddr, size); Linux takes module 0 as its initrd.
    """
    if len(memmap) > MAX_MEMMAP_ENTRIES:
        raise GuestLoadError(f"memory map has {len(memmap)} entries; the PVH layout holds "
                             f"at most {MAX_MEMMAP_ENTRIES}")
    if len(modules) * MODLIST_ENTRY.size > layout.START_INFO_MEMMAP_ADDR - layout.START_INFO_MODLIST_ADDR:
        raise GuestLoadError(f"{len(modules)} PVH modules do not fit the module list")
    start_info = START_INFO.pack(
        HVM_START_MAGIC, HVM_START_VERSION, 0, len(modules),
        layout.START_INFO_MODLIST_ADDR if modules else 0,
        cmdline_addr, 0,
        layout.START_INFO_MEMMAP_ADDR, len(memmap), 0)
    modlist = b"".join(MODLIST_ENTRY.pack(addr, size, 0, 0) for addr, size in modules)
    table = b"".join(MEMMAP_ENTRY.pack(addr, size, kind, 0) for addr, size, kind in memmap)
    return start_info, modlist, table


def load_pvh(memory: "GuestMemory", kernel: bytes | str | os.PathLike, cmdline: str,
             initrd: bytes | None = None,
             e820: Sequence[tuple[int, int, int]] | None = None, *,
             name: str | None = None) -> LinuxBoot:
    """Load an ELF kernel with a PVH note, its command line and initrd.

    Returns how to start the boot vCPU: 32-bit protected mode, flat 4 GiB
    code and data segments, paging off, ``rip`` = the PVH entry, ``rbx`` =
    the ``hvm_start_info`` address. Checks everything before writing.
    """
    data, default_name = read_kernel(kernel)
    name = name or default_name
    image = parse_pvh(data, name)
    if e820 is None:
        e820 = default_e820(memory)
    check_e820(memory, e820)
    for seg in image.segments:
        if not memory.contains(seg.paddr, seg.memsz):
            raise GuestLoadError(
                f"{name}: a segment needs guest RAM [{seg.paddr:#x}, {seg.end:#x}) but RAM "
                f"ends at {memory.end:#x} ({memory.end / (1 << 20):.0f} MiB)")
        if seg.paddr < layout.START_INFO_END and seg.end > layout.START_INFO_ADDR:
            raise GuestLoadError(f"{name}: a segment at {seg.paddr:#x} overlaps the boot "
                                 f"structures at {layout.START_INFO_ADDR:#x}")
        if seg.paddr < layout.CMDLINE_ADDR + layout.CMDLINE_MAX and seg.end > layout.CMDLINE_ADDR:
            raise GuestLoadError(f"{name}: a segment at {seg.paddr:#x} overlaps the command "
                                 f"line at {layout.CMDLINE_ADDR:#x}")
    modules: list[tuple[int, int]] = []
    initrd_addr = initrd_size = 0
    if initrd:
        initrd_addr = place_initrd(e820, len(initrd), low=image.end, limit=layout.LOW_4G,
                                   name=name)
        initrd_size = len(initrd)
        modules.append((initrd_addr, initrd_size))
    start_info, modlist, memmap = build_start_info(
        cmdline_addr=layout.CMDLINE_ADDR, modules=modules, memmap=e820)
    try:
        write_cmdline(memory, layout.CMDLINE_ADDR, cmdline, layout.CMDLINE_MAX)
        view = memoryview(data)
        for seg in image.segments:
            memory.write(seg.paddr, view[seg.offset:seg.offset + seg.filesz])
            if seg.memsz > seg.filesz:
                memory.fill(seg.paddr + seg.filesz, seg.memsz - seg.filesz)
        if initrd:
            memory.write(initrd_addr, initrd)
        memory.fill(layout.START_INFO_ADDR, layout.START_INFO_END - layout.START_INFO_ADDR)
        memory.write(layout.START_INFO_ADDR, start_info)
        if modlist:
            memory.write(layout.START_INFO_MODLIST_ADDR, modlist)
        memory.write(layout.START_INFO_MEMMAP_ADDR, memmap)
    except GuestMemoryError as exc:
        raise GuestLoadError(f"{name}: {exc}") from exc
    return LinuxBoot(
        mode="pvh32", entry=image.entry, kernel_start=image.start, kernel_end=image.end,
        start_info_addr=layout.START_INFO_ADDR, cmdline_addr=layout.CMDLINE_ADDR,
        cmdline=cmdline, initrd_addr=initrd_addr, initrd_size=initrd_size,
        regs={"rip": image.entry, "rbx": layout.START_INFO_ADDR}, protocol="pvh")
