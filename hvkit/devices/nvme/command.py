"""A submission queue entry, decoded once from a private copy.

The entry is copied out of guest memory before it is decoded, so the guest
cannot change a field between its check and its use.
"""
from __future__ import annotations

import struct
from typing import NamedTuple

_SQE = struct.Struct("<BBHIIIQQQIIIIII")


class Command(NamedTuple):
    opcode: int
    flags: int
    cid: int
    nsid: int
    cdw2: int
    cdw3: int
    mptr: int
    prp1: int
    prp2: int
    cdw10: int
    cdw11: int
    cdw12: int
    cdw13: int
    cdw14: int
    cdw15: int

    @classmethod
    def decode(cls, raw: bytes) -> "Command":
        return cls._make(_SQE.unpack(raw))

    def encode(self) -> bytes:
        return _SQE.pack(*self)

    @property
    def fuse(self) -> int:
        return self.flags & 0x3

    @property
    def psdt(self) -> int:
        return (self.flags >> 6) & 0x3


def make_command(opcode: int, cid: int = 0, nsid: int = 0, prp1: int = 0, prp2: int = 0,
                 cdw10: int = 0, cdw11: int = 0, cdw12: int = 0, cdw13: int = 0,
                 cdw14: int = 0, cdw15: int = 0, flags: int = 0) -> bytes:
    """Encode a 64-byte submission queue entry (for drivers and tests)."""
    return _SQE.pack(opcode, flags, cid, nsid, 0, 0, 0, prp1, prp2,
                     cdw10, cdw11, cdw12, cdw13, cdw14, cdw15)
