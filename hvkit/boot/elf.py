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
    from hvkit.memory.guest import GuestMemory

PT_LOAD = "PT_LOAD"


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

    def load(self, memory: "GuestMemory") -> int:
        for seg in self.segments:
            memory.write(seg.paddr, seg.data)
            if seg.memsz > len(seg.data):
                memory.fill(seg.paddr + len(seg.data), seg.memsz - len(seg.data))
        return self.entry


_cache: dict[tuple[str, int, int], ElfImage] = {}


def parse_elf(path: str | os.PathLike, data: bytes | None = None) -> ElfImage:
    """Parse an ELF guest; cached per (path, mtime, size) so that starting
    many VMs from one file parses it once."""
    p = os.fspath(path)
    if data is None:
        st = check_regular(p, "guest image")
        key = (p, st.st_mtime_ns, st.st_size)
        hit = _cache.get(key)
        if hit is not None:
            return hit
        data = read_regular(p, "guest image")
    else:
        key = None
    image = _parse(p, data)
    if key is not None:
        _cache[key] = image
    return image


def _parse(path: str, data: bytes) -> ElfImage:
    if data[:4] != b"\x7fELF":
        raise GuestLoadError(f"{path}: not an ELF file (magic {data[:4]!r})")
    try:
        elf = ELFFile(io.BytesIO(data))
        if elf.elfclass != 64:
            raise GuestLoadError(f"{path}: {elf.elfclass}-bit ELF; hvkit runs x86-64 (ELFCLASS64) guests")
        if elf["e_machine"] != "EM_X86_64":
            raise GuestLoadError(f"{path}: ELF for {elf['e_machine']}, not x86-64 (EM_X86_64)")
        if elf["e_type"] != "ET_EXEC":
            raise GuestLoadError(f"{path}: ELF type {elf['e_type']}; a guest must be a static "
                                 f"executable (ET_EXEC)")
        segments = []
        for ph in elf.iter_segments():
            if ph["p_type"] != PT_LOAD or ph["p_memsz"] == 0:
                continue
            if ph["p_filesz"] > ph["p_memsz"]:
                raise GuestLoadError(f"{path}: a PT_LOAD segment has p_filesz > p_memsz")
            if ph["p_offset"] + ph["p_filesz"] > len(data):
                raise GuestLoadError(f"{path}: a PT_LOAD segment runs past the end of the file")
            paddr = ph["p_paddr"] or ph["p_vaddr"]
            segments.append(Segment(paddr, ph.data(), ph["p_memsz"]))
        if not segments:
            raise GuestLoadError(f"{path}: no PT_LOAD segments")
        entry = elf["e_entry"]
        if not any(s.paddr <= entry < s.end for s in segments):
            raise GuestLoadError(f"{path}: entry point {entry:#x} is outside every loaded segment")
        symbols = {}
        symtab = elf.get_section_by_name(".symtab")
        if symtab is not None:
            for sym in symtab.iter_symbols():
                if sym.name and sym["st_info"]["type"] in ("STT_OBJECT", "STT_FUNC", "STT_NOTYPE"):
                    symbols[sym.name] = sym["st_value"]
    except ELFError as exc:
        raise GuestLoadError(f"{path}: malformed ELF: {exc}") from None
    ordered = sorted(segments, key=lambda s: s.paddr)
    for a, b in zip(ordered, ordered[1:]):
        if b.paddr < a.end:
            raise GuestLoadError(f"{path}: PT_LOAD segments overlap at {b.paddr:#x}")
    return ElfImage(path, entry, segments, symbols)
