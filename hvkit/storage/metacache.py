"""The in-memory copy of metadata blocks and the set changed since the
last commit.

Logical transactions edit blocks here; the commit seals and journals the
dirty set at once, which is what lets many logical transactions that touch
the same bitmap or pointer block share one journal image.
"""
from __future__ import annotations

from hvkit.storage import metablock as mb
from hvkit.storage.hostfile import HostFile

_CLEAN_LIMIT = 1 << 15  # cached clean blocks (128 MiB) before the cache is trimmed


class MetaCache:
    def __init__(self, f: HostFile) -> None:
        self.f = f
        self.blocks: dict[int, bytearray] = {}
        self.dirty: dict[int, None] = {}

    def get(self, blockno: int, kind: int) -> bytearray:
        buf = self.blocks.get(blockno)
        if buf is None:
            buf = bytearray(self.f.pread(blockno * mb.META, mb.META))
            mb.verify(buf, kind, blockno)
            if len(self.blocks) >= _CLEAN_LIMIT:
                self._trim()
            self.blocks[blockno] = buf
        return buf

    def create(self, blockno: int, kind: int) -> bytearray:
        buf = mb.new_block(kind, blockno)
        self.blocks[blockno] = buf
        self.dirty[blockno] = None
        return buf

    def touch(self, blockno: int) -> None:
        self.dirty[blockno] = None

    def take_dirty(self) -> list[int]:
        out = list(self.dirty)
        self.dirty.clear()
        return out

    def drop(self) -> None:
        """Forget everything (after a failed commit the copy may be ahead of disk)."""
        self.blocks.clear()
        self.dirty.clear()

    def _trim(self) -> None:
        for bno in [b for b in self.blocks if b not in self.dirty]:
            del self.blocks[bno]
