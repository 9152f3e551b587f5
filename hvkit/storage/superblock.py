"""Volume geometry and the superblock that records it.

The geometry is fixed at format time; every region's position is derived
from the few numbers the superblock stores, so the superblock (and its
backup copy in block 1) is the only thing needed to find everything else.
"""
from __future__ import annotations

import struct
import uuid as _uuid
from dataclasses import dataclass

from hvkit.errors import ConfigError
from hvkit.storage import metablock as mb

#: bits held by one bitmap block
BITS_PER_BITMAP_BLOCK = mb.PAYLOAD * 8

SB_PRIMARY = 0
SB_BACKUP = 1
JSB_A = 2
JSB_B = 3
JOURNAL_START = 4

MIN_JOURNAL_BLOCKS = 16
MAX_FILES_LIMIT = 4096

# block_size, sub_block_size, n_blocks, n_sub, n_ptr, max_files, journal_blocks, uuid
_SB = struct.Struct("<IIQQQII16s")

RES_BLOCK = 0   # file blocks
RES_SUB = 1     # sub-blocks
RES_PTR = 2     # pointer blocks
RESOURCE_NAMES = {RES_BLOCK: "file block", RES_SUB: "sub-block", RES_PTR: "pointer block"}


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _align(a: int, b: int) -> int:
    return _ceil(a, b) * b


@dataclass(frozen=True)
class Geometry:
    """Sizes and region positions of a volume (metadata in 4 KiB blocks)."""

    block_size: int
    sub_block_size: int
    n_blocks: int
    n_sub: int
    n_ptr: int
    max_files: int
    journal_blocks: int
    uuid: bytes = b"\0" * 16

    def __post_init__(self) -> None:
        if not _pow2(self.block_size) or not 8192 <= self.block_size <= 1 << 30:
            raise ConfigError(f"block size {self.block_size} must be a power of two "
                              f"between 8 KiB and 1 GiB")
        if (not _pow2(self.sub_block_size) or self.sub_block_size < mb.META
                or self.sub_block_size >= self.block_size):
            raise ConfigError(f"sub-block size {self.sub_block_size} must be a power "
                              f"of two, at least 4 KiB and smaller than the block "
                              f"size {self.block_size}")
        if not 1 <= self.n_blocks < 1 << 40:
            raise ConfigError(f"volume capacity of {self.n_blocks} blocks is out of range")
        if not 0 <= self.n_sub < 1 << 40 or not 1 <= self.n_ptr < 1 << 40:
            raise ConfigError("sub-block or pointer-block count out of range")
        if not 1 <= self.max_files <= MAX_FILES_LIMIT:
            raise ConfigError(f"max files {self.max_files} must be 1..{MAX_FILES_LIMIT}")
        if not MIN_JOURNAL_BLOCKS <= self.journal_blocks <= 1 << 20:
            raise ConfigError(f"journal of {self.journal_blocks} blocks must be "
                              f"{MIN_JOURNAL_BLOCKS}..{1 << 20} blocks")

    # -- derived layout (metadata block numbers) ---------------------------
    def bitmap_blocks(self, res: int) -> int:
        n = (self.n_blocks, self.n_sub, self.n_ptr)[res]
        return max(1, _ceil(n, BITS_PER_BITMAP_BLOCK))

    def resource_count(self, res: int) -> int:
        return (self.n_blocks, self.n_sub, self.n_ptr)[res]

    def bitmap_start(self, res: int) -> int:
        start = JOURNAL_START + self.journal_blocks
        for r in range(res):
            start += self.bitmap_blocks(r)
        return start

    @property
    def desc_start(self) -> int:
        return self.bitmap_start(RES_PTR) + self.bitmap_blocks(RES_PTR)

    @property
    def ptr_start(self) -> int:
        return self.desc_start + self.max_files

    @property
    def meta_end(self) -> int:
        return self.ptr_start + self.n_ptr

    @property
    def sub_offset(self) -> int:
        return self.meta_end * mb.META

    @property
    def data_offset(self) -> int:
        end = self.sub_offset + self.n_sub * self.sub_block_size
        return _align(end, min(self.block_size, 1 << 20))

    @property
    def file_size(self) -> int:
        return self.data_offset + self.n_blocks * self.block_size

    @property
    def capacity(self) -> int:
        return self.n_blocks * self.block_size

    def block_offset(self, index: int) -> int:
        return self.data_offset + index * self.block_size

    def sub_block_offset(self, index: int) -> int:
        return self.sub_offset + index * self.sub_block_size

    # -- encoding ----------------------------------------------------------
    def encode(self, blockno: int) -> bytearray:
        buf = mb.new_block(mb.KIND_SUPER, blockno)
        _SB.pack_into(buf, mb.HDR, self.block_size, self.sub_block_size, self.n_blocks,
                      self.n_sub, self.n_ptr, self.max_files, self.journal_blocks, self.uuid)
        return mb.seal(buf, 0)

    @classmethod
    def decode(cls, buf: bytes | bytearray, blockno: int) -> "Geometry":
        mb.verify(buf, mb.KIND_SUPER, blockno)
        try:
            return cls(*_SB.unpack_from(buf, mb.HDR))
        except ConfigError as e:
            raise mb.CorruptMetadata(f"superblock at block {blockno}: {e}",
                                     blockno, mb.KIND_SUPER) from e

    @classmethod
    def for_capacity(cls, capacity: int, *, block_size: int = 1 << 20,
                     sub_block_size: int = 64 << 10, max_files: int = 64,
                     journal_size: int = 4 << 20, n_sub: int | None = None) -> "Geometry":
        """A geometry with room for ``capacity`` bytes of file data, sized so
        pointer blocks and sub-blocks never run out before data blocks do."""
        if capacity <= 0:
            raise ConfigError(f"volume capacity must be positive, got {capacity}")
        n_blocks = _ceil(capacity, block_size)
        if n_sub is None:
            # only a file's last block can be short, so one sub-block per file
            n_sub = max_files
        # scattered writes can need a leaf and an upper pointer block per data
        # block; the pointer region is sparse, so reserving it costs nothing
        n_ptr = 2 * (n_blocks + n_sub) + 4 * max_files + 16
        return cls(block_size, sub_block_size, n_blocks, n_sub, n_ptr, max_files,
                   max(MIN_JOURNAL_BLOCKS, journal_size // mb.META),
                   _uuid.uuid4().bytes)
