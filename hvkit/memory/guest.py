"""Guest RAM as host mappings, one per region.

Each region is its own mapping so that a backend process (an NVMe
accelerator, say) can map exactly the memfd it needs, and so that a region
can be backed differently from its neighbours (memfd for sharing, private
anonymous memory for KSM).
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

from hvkit.errors import ConfigError, GuestMemoryError

PAGE_SIZE = 4096
HUGE_PAGE_SIZE = 2 << 20

MFD_HUGETLB = 0x0004
MFD_HUGE_2MB = 21 << 26

BACKINGS = ("memfd", "anonymous", "file")


@dataclass
class MemoryRegion:
    """One contiguous range of guest-physical memory and its host mapping.

    ``backing="memfd"`` is shareable with other processes (map ``fd``) but
    KSM never merges it; ``backing="anonymous"`` is private to this process,
    cannot be shared, and is the only kind KSM can merge; ``backing="file"``
    maps ``source`` (from ``source_offset``) private: copy-on-write RAM that
    starts as the file's contents (a snapshot restored without copying).
    """

    gpa: int
    size: int
    backing: str = "memfd"
    hugepages: bool = False
    name: str = "ram"
    read_only: bool = False
    source: str | None = None
    source_offset: int = 0
    fd: int = -1
    mapping: mmap.mmap | None = field(default=None, repr=False)
    _hva: int = field(default=0, repr=False)

    @property
    def end(self) -> int:
        return self.gpa + self.size

    @property
    def hva(self) -> int:
        """Host virtual address of the first byte (for KVM memory slots)."""
        if not self._hva:
            from hvkit import _native
            self._hva = _native.buffer_address(self.mapping)
        return self._hva

    def contains(self, gpa: int, size: int = 1) -> bool:
        return self.gpa <= gpa and gpa + size <= self.end

    def open(self) -> None:
        page = HUGE_PAGE_SIZE if self.hugepages else PAGE_SIZE
        if self.size <= 0 or self.size % page:
            raise ConfigError(
                f"memory region {self.name!r}: size {self.size:#x} must be a "
                f"positive multiple of {page:#x}")
        if self.gpa % page:
            raise ConfigError(
                f"memory region {self.name!r}: address {self.gpa:#x} is not "
                f"aligned to {page:#x}")
        if self.backing not in BACKINGS:
            raise ConfigError(
                f"memory region {self.name!r}: backing {self.backing!r} is not "
                f"one of {', '.join(BACKINGS)}")
        if self.backing == "memfd":
            flags = os.MFD_CLOEXEC
            if self.hugepages:
                flags |= MFD_HUGETLB | MFD_HUGE_2MB
            try:
                self.fd = os.memfd_create(f"hvkit-{self.name}", flags)
                os.ftruncate(self.fd, self.size)
                self.mapping = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED,
                                         mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as exc:
                self.close()
                hint = (" (reserve huge pages first: "
                        "echo N > /proc/sys/vm/nr_hugepages)") if self.hugepages else ""
                raise ConfigError(
                    f"memory region {self.name!r}: cannot allocate "
                    f"{self.size} bytes: {exc.strerror}{hint}") from exc
        elif self.backing == "file":
            if self.source is None or self.hugepages:
                raise ConfigError(f"memory region {self.name!r}: file backing needs a "
                                  "source file and no huge pages")
            try:
                fd = os.open(self.source, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    self.mapping = mmap.mmap(fd, self.size, mmap.MAP_PRIVATE,
                                             mmap.PROT_READ | mmap.PROT_WRITE,
                                             offset=self.source_offset)
                finally:
                    os.close(fd)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"memory region {self.name!r}: cannot map "
                                  f"{self.source} at {self.source_offset:#x}: {exc}") from None
        else:
            if self.hugepages:
                raise ConfigError(
                    f"memory region {self.name!r}: huge pages need memfd backing")
            self.mapping = mmap.mmap(-1, self.size,
                                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                     mmap.PROT_READ | mmap.PROT_WRITE)

    def close(self) -> None:
        if self.mapping is not None:
            try:
                self.mapping.close()
            except BufferError:
                # A caller still holds a memoryview; the mapping goes when it does.
                pass
            self.mapping = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._hva = 0


class GuestMemory:
    """Guest RAM: a set of non-overlapping regions.

    Every access is bounds-checked against the regions, because addresses
    come from the guest and the guest is not trusted.
    """

    def __init__(self, regions: Iterable[MemoryRegion] = ()) -> None:
        self.regions: list[MemoryRegion] = []
        self._last: MemoryRegion | None = None
        self._written: set[int] | None = None
        self._before: "Callable[[int, int], None] | None" = None
        for region in regions:
            self.add_region(region)

    @classmethod
    def create(cls, size: int, *, hugepages: bool = False,
               backing: str = "memfd", gpa: int = 0) -> "GuestMemory":
        """One region of ``size`` bytes at ``gpa`` (the common microVM case)."""
        return cls([MemoryRegion(gpa, size, backing=backing, hugepages=hugepages)])

    def add_region(self, region: MemoryRegion) -> MemoryRegion:
        for other in self.regions:
            if region.gpa < other.end and other.gpa < region.end:
                raise ConfigError(
                    f"memory region {region.name!r} [{region.gpa:#x}, {region.end:#x}) "
                    f"overlaps {other.name!r} [{other.gpa:#x}, {other.end:#x})")
        if region.mapping is None:
            region.open()
        self.regions.append(region)
        self.regions.sort(key=lambda r: r.gpa)
        return region

    def remove_region(self, region: MemoryRegion) -> None:
        self.regions.remove(region)
        if self._last is region:
            self._last = None
        region.close()

    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    @property
    def end(self) -> int:
        """One past the highest guest-physical address backed by RAM."""
        return max((r.end for r in self.regions), default=0)

    def region_of(self, gpa: int, size: int = 1) -> MemoryRegion:
        last = self._last
        if last is not None and last.contains(gpa, size):
            return last
        for region in self.regions:
            if region.contains(gpa, size):
                self._last = region
                return region
        raise GuestMemoryError(
            f"guest-physical range [{gpa:#x}, {gpa + size:#x}) is not inside "
            f"guest RAM", gpa, size)

    def contains(self, gpa: int, size: int = 1) -> bool:
        if gpa < 0 or size < 0:
            return False
        try:
            self._spans(gpa, size)
        except GuestMemoryError:
            return False
        return True

    def _spans(self, gpa: int, size: int) -> list[tuple[MemoryRegion, int, int]]:
        """Split [gpa, gpa+size) into (region, offset, length) pieces that
        cover it exactly, or raise if any byte is outside RAM."""
        if gpa < 0 or size < 0:
            raise GuestMemoryError(
                f"invalid guest-physical range: address {gpa:#x}, size {size}", gpa, size)
        region = self._last
        if region is not None and region.contains(gpa, size):
            return [(region, gpa - region.gpa, size)]
        out = []
        cur, left = gpa, size
        for region in self.regions:
            if left == 0:
                break
            if region.gpa <= cur < region.end:
                n = min(left, region.end - cur)
                out.append((region, cur - region.gpa, n))
                cur += n
                left -= n
        if left:
            raise GuestMemoryError(
                f"guest-physical range [{gpa:#x}, {gpa + size:#x}) is not inside "
                f"guest RAM", gpa, size)
        if len(out) == 1:
            self._last = out[0][0]
        return out

    # -- host writes, for diff snapshots -------------------------------------
    def track_writes(self) -> None:
        """Remember the pages the host writes through this object from now
        on (KVM's dirty log sees only the guest's own writes). A ``view()``
        counts as a write: it may be written through."""
        if self._written is None:
            self._written = set()

    def untrack_writes(self) -> None:
        self._written = None

    def take_written(self) -> set[int]:
        """Guest page numbers (gpa // 4096) written since the last call."""
        out = self._written or set()
        if self._written is not None:
            self._written = set()
        return out

    def set_access_hook(self, hook: "Callable[[int, int], None] | None") -> None:
        """``hook(gpa, size)`` runs before every host access through this
        object. A lazy restore's pager uses it to bring the pages in from the
        calling thread: a host thread that touched a missing page while
        holding the GIL would wait for a pager thread that needs it."""
        self._before = hook

    def _mark(self, gpa: int, size: int) -> None:
        if size > 0:
            self._written.update(range(gpa // PAGE_SIZE,  # type: ignore[union-attr]
                                       (gpa + size - 1) // PAGE_SIZE + 1))

    def view(self, gpa: int, size: int) -> memoryview:
        """Zero-copy access to [gpa, gpa+size); must lie in one region."""
        region = self.region_of(gpa, size)
        if self._before is not None:
            self._before(gpa, size)
        if self._written is not None:
            self._mark(gpa, size)
        off = gpa - region.gpa
        return memoryview(region.mapping)[off:off + size]

    def read(self, gpa: int, size: int) -> bytes:
        spans = self._spans(gpa, size)
        if self._before is not None:
            self._before(gpa, size)
        if len(spans) == 1:
            region, off, n = spans[0]
            return region.mapping[off:off + n]
        return b"".join(r.mapping[o:o + n] for r, o, n in spans)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        data = memoryview(data).cast("B")
        spans = self._spans(gpa, len(data))
        if self._before is not None:
            self._before(gpa, len(data))
        if self._written is not None:
            self._mark(gpa, len(data))
        pos = 0
        for region, off, n in spans:
            region.mapping[off:off + n] = data[pos:pos + n]
            pos += n

    def fill(self, gpa: int, size: int, value: int = 0) -> None:
        spans = self._spans(gpa, size)
        if self._before is not None:
            self._before(gpa, size)
        if self._written is not None:
            self._mark(gpa, size)
        for region, off, n in spans:
            region.mapping[off:off + n] = bytes([value]) * n

    def read_u8(self, gpa: int) -> int:
        return self.read(gpa, 1)[0]

    def read_u16(self, gpa: int) -> int:
        return struct.unpack("<H", self.read(gpa, 2))[0]

    def read_u32(self, gpa: int) -> int:
        return struct.unpack("<I", self.read(gpa, 4))[0]

    def read_u64(self, gpa: int) -> int:
        return struct.unpack("<Q", self.read(gpa, 8))[0]

    def write_u8(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<B", value))

    def write_u16(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<H", value))

    def write_u32(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<I", value))

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<Q", value))

    def __iter__(self) -> Iterator[MemoryRegion]:
        return iter(self.regions)

    def close(self) -> None:
        for region in self.regions:
            region.close()
        self.regions.clear()
        self._last = None

    def __enter__(self) -> "GuestMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
