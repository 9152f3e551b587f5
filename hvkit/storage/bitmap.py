"""Allocation bitmaps: one bit per file block, sub-block or pointer block.

Bits live in checksummed bitmap blocks edited through the metadata cache,
so an allocation is journaled with the block map change that uses it.
Allocation is next-fit from a cursor, which keeps it O(1) amortized.
"""
from __future__ import annotations

from hvkit.storage import metablock as mb
from hvkit.storage.backend import StorageError
from hvkit.storage.metacache import MetaCache
from hvkit.storage.superblock import BITS_PER_BITMAP_BLOCK, RESOURCE_NAMES, Geometry

_BYTES = mb.PAYLOAD


class VolumeFull(StorageError):
    """No free unit of a resource is left in the volume."""


class Bitmap:
    def __init__(self, cache: MetaCache, geom: Geometry, res: int) -> None:
        self.cache = cache
        self.res = res
        self.start = geom.bitmap_start(res)
        self.nblocks = geom.bitmap_blocks(res)
        self.count = geom.resource_count(res)
        self.cursor = 0
        self._used: int | None = None
        self.name = RESOURCE_NAMES[res]

    def _locate(self, index: int) -> tuple[int, int, int]:
        if not 0 <= index < self.count:
            raise StorageError(f"{self.name} {index} out of range (0..{self.count - 1})")
        b, bit = divmod(index, BITS_PER_BITMAP_BLOCK)
        return self.start + b, mb.HDR + bit // 8, 1 << (bit % 8)

    def test(self, index: int) -> bool:
        bno, off, mask = self._locate(index)
        return bool(self.cache.get(bno, mb.KIND_BITMAP)[off] & mask)

    def set(self, index: int, value: bool) -> None:
        bno, off, mask = self._locate(index)
        buf = self.cache.get(bno, mb.KIND_BITMAP)
        if self._used is not None and bool(buf[off] & mask) != value:
            self._used += 1 if value else -1
        if value:
            buf[off] |= mask
        else:
            buf[off] &= ~mask & 0xFF
        self.cache.touch(bno)

    def alloc(self) -> int:
        """Take the next free unit at or after the cursor; the last step
        revisits the first block from its start, so every bit is seen."""
        start_block, bit = divmod(self.cursor, BITS_PER_BITMAP_BLOCK)
        first_byte = bit // 8
        for step in range(self.nblocks + 1):
            b = (start_block + step) % self.nblocks
            buf = self.cache.get(self.start + b, mb.KIND_BITMAP)
            lo = first_byte if step == 0 else 0
            rest = bytes(buf[mb.HDR + lo:mb.HDR + _BYTES])
            skip = len(rest) - len(rest.lstrip(b"\xff"))
            if skip < len(rest):
                byte = rest[skip]
                bitpos = (~byte & (byte + 1)).bit_length() - 1
                index = b * BITS_PER_BITMAP_BLOCK + (lo + skip) * 8 + bitpos
                if index < self.count:
                    buf[mb.HDR + lo + skip] |= 1 << bitpos
                    if self._used is not None:
                        self._used += 1
                    self.cache.touch(self.start + b)
                    self.cursor = (index + 1) % self.count
                    return index
        raise VolumeFull(f"volume full: no free {self.name} left ({self.count} in all)")

    def free(self, index: int) -> None:
        self.set(index, False)

    def used_count(self) -> int:
        """Units in use, counted once and then kept up to date."""
        if self._used is None:
            self._used = self.used()
        return self._used

    def forget(self) -> None:
        self._used = None

    def used(self) -> int:
        """Units in use, counted from the bitmap blocks."""
        n = 0
        for b in range(self.nblocks):
            buf = self.cache.get(self.start + b, mb.KIND_BITMAP)
            bits = int.from_bytes(buf[mb.HDR:], "little")
            if b == self.nblocks - 1:  # ignore bits past the last unit
                bits &= (1 << (self.count - b * BITS_PER_BITMAP_BLOCK)) - 1
            n += bits.bit_count()
        return n
