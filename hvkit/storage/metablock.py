"""The common 4 KiB metadata block: header, crc32c seal and verification.

Every on-disk structure of a block-file volume (superblock, journal
superblock, bitmap, descriptor, pointer block, journal records) is one of
these blocks, so that one routine checks version, kind, self-address and
checksum for all of them: a torn, misdirected or bit-flipped write is
caught wherever it lands.
"""
from __future__ import annotations

import struct

import crc32c as _crc32c

from hvkit.storage.backend import StorageError

META = 4096
MAGIC = 0x4D4B5648  # b"HVKM" little-endian
VERSION = 1
#: magic, kind, version, crc, reserved, blockno (self address), generation
HEADER = struct.Struct("<IHHIIQQ")
HDR = HEADER.size  # 32
PAYLOAD = META - HDR

KIND_SUPER = 1
KIND_JSUPER = 2
KIND_BITMAP = 3
KIND_DESC = 4
KIND_PTR = 5
KIND_JHEADER = 6
KIND_JCOMMIT = 7

KIND_NAMES = {
    KIND_SUPER: "superblock", KIND_JSUPER: "journal superblock",
    KIND_BITMAP: "bitmap block", KIND_DESC: "file descriptor",
    KIND_PTR: "pointer block", KIND_JHEADER: "journal header",
    KIND_JCOMMIT: "journal commit",
}

_ZERO4 = b"\0\0\0\0"


class CorruptMetadata(StorageError):
    """A metadata block failed its magic, version, address or crc32c check."""

    def __init__(self, message: str, blockno: int = -1, kind: int = 0) -> None:
        super().__init__(message)
        self.blockno = blockno
        self.kind = kind


def crc32c(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """crc32c (Castagnoli), hardware-accelerated by the ``crc32c`` package."""
    return _crc32c.crc32c(data, value)


def block_crc(buf: bytes | bytearray | memoryview) -> int:
    """The checksum of a metadata block, computed with its crc field as zero."""
    mv = memoryview(buf)
    c = _crc32c.crc32c(mv[:8])
    c = _crc32c.crc32c(_ZERO4, c)
    return _crc32c.crc32c(mv[12:META], c)


def new_block(kind: int, blockno: int) -> bytearray:
    """A zeroed block whose header already names its kind and address."""
    buf = bytearray(META)
    HEADER.pack_into(buf, 0, MAGIC, kind, VERSION, 0, 0, blockno, 0)
    return buf


def seal(buf: bytearray, generation: int | None = None) -> bytearray:
    """Stamp the generation (if given) and the crc32c into ``buf``."""
    if generation is not None:
        struct.pack_into("<Q", buf, 24, generation)
    struct.pack_into("<I", buf, 8, block_crc(buf))
    return buf


def header(buf: bytes | bytearray | memoryview) -> tuple[int, int, int, int, int, int, int]:
    return HEADER.unpack_from(buf, 0)


def verify(buf: bytes | bytearray | memoryview, kind: int, blockno: int) -> None:
    """Raise ``CorruptMetadata`` unless ``buf`` is a sound block of ``kind``
    sealed for address ``blockno``."""
    name = KIND_NAMES.get(kind, f"kind {kind}")
    size = memoryview(buf).nbytes
    if size < META:
        raise CorruptMetadata(f"{name} at block {blockno}: short read "
                              f"({size} of {META} bytes)", blockno, kind)
    magic, k, version, crc, _r, addr, _gen = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise CorruptMetadata(f"{name} at block {blockno}: bad magic {magic:#x}",
                              blockno, kind)
    if version != VERSION:
        raise CorruptMetadata(f"{name} at block {blockno}: unsupported version "
                              f"{version} (this build reads {VERSION})", blockno, kind)
    if k != kind:
        found = KIND_NAMES.get(k, f"kind {k}")
        raise CorruptMetadata(f"{name} at block {blockno}: found a {found} instead",
                              blockno, kind)
    if addr != blockno:
        raise CorruptMetadata(f"{name} at block {blockno}: sealed for block {addr} "
                              f"(misdirected write)", blockno, kind)
    actual = block_crc(buf)
    if actual != crc:
        raise CorruptMetadata(f"{name} at block {blockno}: bad checksum "
                              f"(stored {crc:#010x}, computed {actual:#010x})",
                              blockno, kind)


def is_sound(buf: bytes | bytearray | memoryview, kind: int, blockno: int) -> bool:
    try:
        verify(buf, kind, blockno)
    except CorruptMetadata:
        return False
    return True
