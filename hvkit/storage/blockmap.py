"""File descriptors and their block maps.

A descriptor (one metadata block per file) holds the file's name and
virtual size and a block map: 485 direct pointers, then a single, a double
and a triple indirect pointer to pointer blocks of 508 entries each. With
1 MiB blocks that reaches 131 TiB, so a 1 TiB thin disk needs no special
case. A pointer is a u64: two kind bits (file block, sub-block, pointer
block) over the index; zero is a hole that reads as zeros.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from hvkit.storage import metablock as mb
from hvkit.storage.backend import StorageError
from hvkit.storage.superblock import RES_BLOCK, RES_PTR, RES_SUB, Geometry

PTRS_PER_BLOCK = mb.PAYLOAD // 8  # 508
PTR_OFF = 192
N_SLOTS = (mb.META - PTR_OFF) // 8  # 488
N_DIRECT = N_SLOTS - 3  # 485
SLOT_SINGLE = N_DIRECT
SLOT_DOUBLE = N_DIRECT + 1
SLOT_TRIPLE = N_DIRECT + 2
P = PTRS_PER_BLOCK
MAX_FILE_BLOCKS = N_DIRECT + P + P * P + P * P * P

PK_BLOCK = 1
PK_SUB = 2
PK_PTR = 3
_KIND_RES = {PK_BLOCK: RES_BLOCK, PK_SUB: RES_SUB, PK_PTR: RES_PTR}
PK_NAMES = {PK_BLOCK: "file block", PK_SUB: "sub-block", PK_PTR: "pointer block"}
_INDEX_MASK = (1 << 48) - 1

#: flags, name_len, size, created_ns, reserved, name
_DESC = struct.Struct("<IIQQQ128s")
DESC_IN_USE = 1
#: set while a disk is being filled (an import): the disk is not usable yet
DESC_INCOMPLETE = 2
NAME_MAX = 128
_U64 = struct.Struct("<Q")


class PointerOutOfRange(StorageError):
    """A block-map pointer names a kind or an index the volume does not have."""


def make_ptr(kind: int, index: int) -> int:
    return (kind << 62) | index


def decode_ptr(ptr: int, geom: Geometry, *, where: str = "") -> tuple[int, int]:
    """Split a non-zero pointer into (kind, index), checking both."""
    kind = ptr >> 62
    index = ptr & _INDEX_MASK
    if kind not in _KIND_RES or (ptr >> 48) & 0x3FFF:
        raise PointerOutOfRange(f"pointer {ptr:#x}{where}: invalid kind bits")
    limit = geom.resource_count(_KIND_RES[kind])
    if index >= limit:
        raise PointerOutOfRange(f"pointer {ptr:#x}{where}: {PK_NAMES[kind]} {index} "
                                f"is out of range (volume has {limit})")
    return kind, index


def resource_of(kind: int) -> int:
    return _KIND_RES[kind]


def path(fbi: int) -> tuple[int, tuple[int, ...]]:
    """Descriptor slot and indices into each pointer-block level for file
    block ``fbi``."""
    if fbi < 0:
        raise ValueError(f"negative file block {fbi}")
    if fbi < N_DIRECT:
        return fbi, ()
    i = fbi - N_DIRECT
    if i < P:
        return SLOT_SINGLE, (i,)
    i -= P
    if i < P * P:
        return SLOT_DOUBLE, (i // P, i % P)
    i -= P * P
    if i < P * P * P:
        return SLOT_TRIPLE, (i // (P * P), (i // P) % P, i % P)
    raise StorageError(f"file block {fbi} beyond the largest file ({MAX_FILE_BLOCKS} blocks)")


def slot_offset(slot: int) -> int:
    return PTR_OFF + 8 * slot


def entry_offset(index: int) -> int:
    return mb.HDR + 8 * index


def get_u64(buf: bytearray | bytes, off: int) -> int:
    return _U64.unpack_from(buf, off)[0]


def set_u64(buf: bytearray, off: int, value: int) -> None:
    _U64.pack_into(buf, off, value)


@dataclass
class DescInfo:
    index: int
    in_use: bool
    name: str
    size: int
    created_ns: int
    incomplete: bool = False


def read_desc(buf: bytes | bytearray, index: int) -> DescInfo:
    flags, nlen, size, created, _r, raw = _DESC.unpack_from(buf, mb.HDR)
    if nlen > NAME_MAX:
        raise mb.CorruptMetadata(f"file descriptor {index}: name length {nlen} > {NAME_MAX}")
    try:
        name = raw[:nlen].decode()
    except UnicodeDecodeError as e:
        raise mb.CorruptMetadata(f"file descriptor {index}: name is not UTF-8") from e
    return DescInfo(index, bool(flags & DESC_IN_USE), name, size, created,
                    bool(flags & DESC_INCOMPLETE))


def write_desc(buf: bytearray, *, in_use: bool, name: str, size: int, created_ns: int,
               incomplete: bool = False) -> None:
    raw = name.encode()
    if len(raw) > NAME_MAX:
        raise StorageError(f"file name {name!r} is longer than {NAME_MAX} bytes")
    flags = (DESC_IN_USE if in_use else 0) | (DESC_INCOMPLETE if incomplete else 0)
    _DESC.pack_into(buf, mb.HDR, flags, len(raw), size, created_ns, 0, raw)


def leaf_kind(geom: Geometry, size: int, fbi: int) -> int:
    """File block or sub-block: a block whose extent in the file fits in a
    sub-block (small files, tails) is stored in one."""
    extent = min(geom.block_size, size - fbi * geom.block_size)
    return PK_SUB if extent <= geom.sub_block_size else PK_BLOCK


def file_blocks(geom: Geometry, size: int) -> int:
    return -(-size // geom.block_size)
