"""Guest RAM to and from a snapshot's memory file.

Saving writes only the chunks that hold data (the file is sparse, so an
idle 1 GiB guest costs what it uses). Restoring has three ways:

- ``eager``: fresh memfd RAM filled from the file's data extents
  (SEEK_DATA/SEEK_HOLE), so holes cost nothing;
- ``cow``: the file itself mapped private into the guest: no copy at all,
  pages are read on first touch and copied on first write, and any number
  of clones share the file's page cache;
- ``lazy``: anonymous RAM filled on first touch through userfaultfd
  (hvkit.snapshot.uffd), the way Firecracker's UFFD restore works.
"""
from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Any

from hvkit.memory.guest import GuestMemory, MemoryRegion
from hvkit.snapshot.format import PAGE, SnapshotError

if TYPE_CHECKING:
    from typing import Iterator, Sequence

CHUNK = 256 << 10
_ZERO = bytes(CHUNK)
MODES = ("eager", "cow", "lazy")


def save_memory(memory: GuestMemory, path: str,
                pages: "list[list[list[int]]] | None" = None) -> list[dict[str, Any]]:
    """Write every region to ``path`` (sparse); returns the region table.
    ``pages``: per region, the [first_page, count] runs to write (a diff);
    None writes every page."""
    regions = []
    offset = 0
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        for index, r in enumerate(memory):
            m = r.mapping
            spans = ([(0, r.size)] if pages is None else
                     [(first * PAGE, count * PAGE) for first, count in pages[index]])
            for start, length in spans:
                # memfd RAM: only its data extents (reading a hole of shared
                # memory would allocate it)
                extents = (data_extents(r.fd, start, start + length) if r.backing == "memfd"
                           else [(start, start + length)])
                for lo, hi in extents:
                    for i in range(lo, hi, CHUNK):
                        n = min(CHUNK, hi - i)
                        data = m[i:i + n]
                        if data != _ZERO[:n]:
                            os.pwrite(fd, data, offset + i)
            regions.append({"name": r.name, "gpa": r.gpa, "size": r.size, "offset": offset,
                            "backing": r.backing})
            offset += -(-r.size // PAGE) * PAGE
        os.ftruncate(fd, offset)
        os.fsync(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    finally:
        os.close(fd)
    return regions


def check_regions(regions: Any, file_size: int) -> list[dict[str, Any]]:
    """The saved region table, checked against itself and the file."""
    out = []
    try:
        for r in regions:
            gpa, size, off = int(r["gpa"]), int(r["size"]), int(r["offset"])
            if size <= 0 or size % PAGE or gpa % PAGE or off % PAGE or off + size > file_size:
                raise SnapshotError(f"memory region {r.get('name')!r} ({gpa:#x}, {size:#x} at "
                                    f"file offset {off:#x}) does not fit the memory file "
                                    f"of {file_size} bytes")
            out.append({"name": str(r["name"]), "gpa": gpa, "size": size, "offset": off,
                        "backing": str(r.get("backing", "memfd"))})
    except (KeyError, TypeError, ValueError) as exc:
        raise SnapshotError(f"snapshot region table is damaged: {exc}") from None
    return out


def restore_memory(path: str, regions: list[dict[str, Any]], mode: str,
                   diffs: "Sequence[tuple[str, list[list[list[int]]]]]" = ()) -> GuestMemory:
    """Guest RAM from a full snapshot's memory file, with ``diffs`` (each a
    memory file and its per-region page runs, oldest first) applied over
    it. A lazy restore only maps the RAM: the pager fills it."""
    if mode not in MODES:
        raise SnapshotError(f"memory restore mode {mode!r} is not one of {', '.join(MODES)}")
    memory = GuestMemory()
    try:
        if mode == "cow":
            for r in regions:
                memory.add_region(MemoryRegion(r["gpa"], r["size"], backing="file", name=r["name"],
                                               source=path, source_offset=r["offset"]))
        elif mode == "lazy":
            for r in regions:
                memory.add_region(MemoryRegion(r["gpa"], r["size"], backing="anonymous",
                                               name=r["name"]))
            return memory
        else:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                for r in regions:
                    backing = r["backing"] if r["backing"] in ("memfd", "anonymous") else "memfd"
                    region = memory.add_region(MemoryRegion(r["gpa"], r["size"], backing=backing,
                                                            name=r["name"]))
                    _fill(fd, region, r["offset"])
            finally:
                os.close(fd)
        for diff_path, pages in diffs:
            _apply_diff(diff_path, memory, regions, pages)
    except BaseException:
        memory.close()
        raise
    return memory


def _apply_diff(path: str, memory: GuestMemory, regions: list[dict[str, Any]],
                pages: "list[list[list[int]]]") -> None:
    """Copy a diff's pages over RAM (a hole in its file is a zero page)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for region, saved, runs in zip(memory, regions, pages):
            mv = memoryview(region.mapping)
            try:
                for first, count in runs:
                    a, n = first * PAGE, count * PAGE
                    got = os.preadv(fd, [mv[a:a + n]], saved["offset"] + a)
                    if got < n:
                        raise SnapshotError(f"{path}: diff memory file ends early")
            finally:
                mv.release()
    finally:
        os.close(fd)


def data_extents(fd: int, start: int, end: int) -> "Iterator[tuple[int, int]]":
    """The [a, b) ranges of file ``fd`` within [start, end) that hold data
    (SEEK_DATA/SEEK_HOLE: holes cost nothing)."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:     # only a hole is left
                return
            yield pos, end                   # no SEEK_DATA here: all of it
            return
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole
        pos = hole


def _fill(fd: int, region: MemoryRegion, offset: int) -> None:
    """Copy the file's data extents of one region into its (zeroed) RAM."""
    mv = memoryview(region.mapping)
    try:
        for data, hole in data_extents(fd, offset, offset + region.size):
            at = data
            while at < hole:
                n = os.preadv(fd, [mv[at - offset:hole - offset]], at)
                if n <= 0:
                    raise SnapshotError(f"memory file ends early at {at:#x}")
                at += n
    finally:
        mv.release()
