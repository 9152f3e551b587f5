"""The scatter-gather write path.

One call takes an array of (guest buffer, disk offset) elements and:

1. sorts it into sets of pieces that target the same file block;
2. resolves each set against the block map;
3. splits out the transaction-dependent sets (holes that need a block,
   maybe pointer blocks, and bitmap bits);
4. generates one logical transaction per dependent set (edits to cached
   metadata blocks);
5. batches them into one physical journal transaction, in which a bitmap or
   pointer block touched by many logical transactions appears once;
6. writes data (new blocks first, which are punched to zeros beforehand so
   no stale bytes can show), flushes, commits with one write and one flush,
   then writes the metadata back in place.

A batch that would outgrow one journal transaction is cut between logical
transactions, never inside one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from hvkit.storage.backend import StorageError
from hvkit.storage.bitmap import VolumeFull

#: metadata blocks one logical transaction may change (an allocation's
#: bitmap, pointer and descriptor blocks, with room to spare)
LOGICAL_TXN_MAX_BLOCKS = 10

if TYPE_CHECKING:
    from hvkit.storage.volume import Location, SGElement, Volume


@dataclass
class WriteResult:
    elements: int = 0
    bytes: int = 0
    block_sets: int = 0
    dependent_sets: int = 0
    logical_txns: int = 0
    physical_txns: int = 0


def sort_by_block(sg: Sequence["SGElement"], block_size: int,
                  size: int) -> dict[int, list[tuple[int, memoryview]]]:
    """Pieces of the array grouped by file block, in block order; within a
    block, pieces keep array order so a later element wins an overlap."""
    sets: dict[int, list[tuple[int, memoryview]]] = {}
    for n, el in enumerate(sg):
        try:
            buf, offset = el
        except (TypeError, ValueError):
            raise StorageError(f"scatter-gather element {n} is not a "
                               f"(buffer, offset) pair: {el!r}") from None
        if not isinstance(offset, int) or isinstance(offset, bool):
            raise StorageError(f"scatter-gather element {n}: offset {offset!r} is not an int")
        try:
            mv = memoryview(buf).cast("B")
        except TypeError:
            raise StorageError(f"scatter-gather element {n}: {type(buf).__name__} "
                               f"is not a buffer") from None
        if offset < 0 or offset + len(mv) > size:
            raise StorageError(f"scatter-gather element {n}: {len(mv)} bytes at offset "
                               f"{offset} fall outside the disk ({size} bytes)")
        pos = 0
        while pos < len(mv):
            fbi, inblk = divmod(offset + pos, block_size)
            k = min(block_size - inblk, len(mv) - pos)
            sets.setdefault(fbi, []).append((inblk, mv[pos:pos + k]))
            pos += k
    return dict(sorted(sets.items()))


def write_sg(vol: "Volume", fidx: int, sg: Sequence["SGElement"], *,
             durable: bool = True) -> WriteResult:
    """With ``durable=False`` the array is written but its last transaction
    is left in the metadata cache for a later commit (``commit_dirty``):
    for filling a disk nobody uses yet (an import), so one commit and one
    flush cover many calls."""
    res = WriteResult(elements=len(sg))
    with vol.lock:
        vol._check_usable()
        size = vol.file_info(fidx).size
        sets = sort_by_block(sg, vol.geom.block_size, size)
        res.block_sets = len(sets)
        resolved: dict[int, Location | None] = {fbi: vol.resolve(fidx, fbi) for fbi in sets}
        dependent = [fbi for fbi, loc in resolved.items() if loc is None]
        res.dependent_sets = len(dependent)
        f = vol.f
        # elements whose blocks exist need no metadata: straight to their place
        for fbi, loc in resolved.items():
            if loc is not None:
                for inblk, mv in sets[fbi]:
                    f.pwrite(loc.offset + inblk, mv)
                    vol.stats.data_writes += 1
                    vol.stats.data_bytes += len(mv)
                    res.bytes += len(mv)
        if not dependent:
            if durable:
                vol.flush()
            return res
        limit = vol.journal.max_images
        pending = 0
        try:
            for fbi in dependent:
                if vol.cache.dirty and len(vol.cache.dirty) + LOGICAL_TXN_MAX_BLOCKS > limit:
                    vol.commit_dirty(data_written=True)
                    res.physical_txns += 1
                    pending = 0
                loc = vol.allocate(fidx, fbi, size)
                res.logical_txns += 1
                pending += 1
                f.punch(loc.offset, loc.length)  # never expose a freed block's old bytes
                for inblk, mv in sets[fbi]:
                    f.pwrite(loc.offset + inblk, mv)
                    vol.stats.data_writes += 1
                    vol.stats.data_bytes += len(mv)
                    res.bytes += len(mv)
        except VolumeFull:
            if vol.cache.dirty:  # keep what was done; the array is not acknowledged
                vol.commit_dirty(data_written=True)
            raise
        except BaseException as e:
            vol._fail(f"write failed: {e}")
            raise
        if durable:
            vol.commit_dirty(data_written=True)
            res.physical_txns += 1
        return res
