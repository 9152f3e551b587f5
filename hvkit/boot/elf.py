"""Load freestanding x86-64 ELF guests (PT_LOAD segments, entry point)."""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from hvkit.files import check_regular, read_regular
from hvkit.errors import GuestLoadError

if TYPE_CHECKING:
    from hvkit.boot.rtlayout import RuntimeLayout
    from hvkit.memory.guest import GuestMemory

PT_LOAD = "PT_LOAD"


@dataclass(frozen=True)
class LoadSegment:
    """A PT_LOAD program header: ``filesz`` bytes at ``offset`` in the file
    go to guest-physical ``paddr``; the rest up to ``memsz`` is zeroed."""
    paddr: int
    offset: int
    filesz: int
    memsz: int

    @property
    def end(self) -> int:
        return self.paddr + self.memsz


def load_segments(elf: ELFFile, file_size: int, name: str) -> list[LoadSegment]:
    """The PT_LOAD segments of an ELF, checked the one way every hvkit
    loader checks them: physical address p_paddr (p_vaddr where a linker
    left p_paddr 0), p_filesz <= p_memsz, inside the file, no overlaps."""
    segments = []
    for ph in elf.iter_segments():
        if ph["p_type"] != PT_LOAD or ph["p_memsz"] == 0:
            continue
        seg = LoadSegment(ph["p_paddr"] or ph["p_vaddr"], ph["p_offset"], ph["p_filesz"],
                          ph["p_memsz"])
        if seg.filesz > seg.memsz:
            raise GuestLoadError(f"{name}: PT_LOAD at {seg.paddr:#x} has p_filesz "
                                 f"{seg.filesz:#x} > p_memsz {seg.memsz:#x}")
        if seg.offset + seg.filesz > file_size:
            raise GuestLoadError(f"{name}: PT_LOAD at {seg.paddr:#x} runs past the end "
                                 f"of the file ({seg.offset + seg.filesz:#x} > "
                                 f"{file_size:#x}); truncated image?")
        segments.append(seg)
    if not segments:
        raise GuestLoadError(f"{name}: no PT_LOAD segments")
    ordered = sorted(segments, key=lambda s: s.paddr)
    for a, b in zip(ordered, ordered[1:]):
        if b.paddr < a.end:
            raise GuestLoadError(f"{name}: PT_LOAD segments at {a.paddr:#x} and {b.paddr:#x} "
                                 f"overlap in physical memory")
    return segments


def check_entry(segments: list[LoadSegment], entry: int, name: str, what: str) -> None:
    """The entry point must be in bytes the file loads (not in zeroed memory)."""
    if not any(s.paddr <= entry < s.paddr + s.filesz for s in segments):
        raise GuestLoadError(f"{name}: {what} {entry:#x} is not inside any loaded segment")


@dataclass
class Segment:
    paddr: int
    data: bytes
    memsz: int

    @property
    def end(self) -> int:
        return self.paddr + self.memsz


@dataclass
class ElfImage:
    """A parsed guest: what to copy where, and where to start."""
    path: str
    entry: int
    segments: list[Segment]
    symbols: dict[str, int] = field(default_factory=dict)
    #: the hvkit runtime's published layout (hvkit.boot.rtlayout), if the
    #: image has one: the VMM then sets the runtime up and enters it at CPL3
    runtime: "RuntimeLayout | None" = None

    def read(self, addr: int, size: int) -> bytes | None:
        """``size`` bytes the file loads at ``addr``, or None if they are not
        all in one segment's file data."""
        for seg in self.segments:
            if seg.paddr <= addr and addr + size <= seg.paddr + len(seg.data):
                return seg.data[addr - seg.paddr:addr - seg.paddr + size]
        return None

    @property
    def start(self) -> int:
        return min(s.paddr for s in self.segments)

    @property
    def end(self) -> int:
        return max(s.end for s in self.segments)

    def check_fits(self, memory_size: int, reserved_below: int = 0) -> None:
        """Raise before any VM exists if the image cannot be placed."""
        if self.end > memory_size:
            raise GuestLoadError(
                f"{self.path}: needs guest RAM up to {self.end:#x} "
                f"({self.end / (1 << 20):.1f} MiB) but the VM has {memory_size:#x} "
                f"({memory_size / (1 << 20):.1f} MiB)")
        if self.start < reserved_below:
            raise GuestLoadError(
                f"{self.path}: loads at {self.start:#x}, inside the VMM's boot area "
                f"below {reserved_below:#x}")

    def load(self, memory: "GuestMemory", *, zero_bss: bool = True) -> int:
        """Copy the segments in; ``zero_bss=False`` when the RAM is fresh
        (already zero), which spares touching every bss page."""
        for seg in self.segments:
            memory.write(seg.paddr, seg.data)
            if zero_bss and seg.memsz > len(seg.data):
                memory.fill(seg.paddr + len(seg.data), seg.memsz - len(seg.data))
        return self.entry


_cache: dict[tuple[str, int, int, int, int, bool], ElfImage] = {}


def parse_elf(path: str | os.PathLike, data: bytes | None = None, *,
              allow_32bit: bool = False) -> ElfImage:
    """Parse an ELF guest; cached per (path, device, inode, mtime, size) so that starting
    many VMs from one file parses it once. hvkit's own guests are x86-64;
    ``allow_32bit`` also takes i386 images (ELFCLASS32, EM_386), for a VMM
    author's loader that starts them in 32-bit protected mode."""
    p = os.fspath(path)
    if data is None:
        st = check_regular(p, "guest image")
        key = (p, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size, allow_32bit)
        hit = _cache.get(key)
        if hit is not None:
            return hit
        data = read_regular(p, "guest image")
    else:
        key = None
    image = _parse(p, data, allow_32bit)
    if key is not None:
        _cache[key] = image
    return image


def _parse(path: str, data: bytes, allow_32bit: bool = False) -> ElfImage:
    if data[:4] != b"\x7fELF":
        raise GuestLoadError(f"{path}: not an ELF file (magic {data[:4]!r})")
    try:
        elf = ELFFile(io.BytesIO(data))
        machines = {64: "EM_X86_64", 32: "EM_386"} if allow_32bit else {64: "EM_X86_64"}
        if elf.elfclass not in machines:
            raise GuestLoadError(f"{path}: {elf.elfclass}-bit ELF; hvkit runs x86-64 (ELFCLASS64) "
                                 "guests (a loader may take i386 ones with allow_32bit=True)")
        if elf["e_machine"] != machines[elf.elfclass]:
            want = {"EM_X86_64": "x86-64", "EM_386": "i386"}[machines[elf.elfclass]]
            raise GuestLoadError(f"{path}: ELF for {elf['e_machine']}, not {want} "
                                 f"({machines[elf.elfclass]})")
        if elf["e_type"] != "ET_EXEC":
            raise GuestLoadError(f"{path}: ELF type {elf['e_type']}; a guest must be a static "
                                 f"executable (ET_EXEC)")
        loads = load_segments(elf, len(data), path)
        entry = elf["e_entry"]
        check_entry(loads, entry, path, "entry point")
        segments = [Segment(s.paddr, data[s.offset:s.offset + s.filesz], s.memsz)
                    for s in loads]
        symbols = {}
        symtab = elf.get_section_by_name(".symtab")
        if symtab is not None:
            for sym in symtab.iter_symbols():
                if sym.name and sym["st_info"]["type"] in ("STT_OBJECT", "STT_FUNC", "STT_NOTYPE"):
                    symbols[sym.name] = sym["st_value"]
    except ELFError as exc:
        raise GuestLoadError(f"{path}: malformed ELF: {exc}") from None
    image = ElfImage(path, entry, segments, symbols)
    if elf.elfclass == 64:
        from hvkit.boot.rtlayout import find_layout
        image.runtime = find_layout(image)
    return image
