"""An NVMe namespace: a BlockBackend seen as logical blocks."""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from typing import Any

from hvkit.errors import ConfigError
from hvkit.storage.backend import BlockBackend

IDENTIFY_SIZE = 4096


@dataclass
class Namespace:
    """``nsid`` starts at 1. ``spec`` tells the accelerator process how to
    open the same backend itself ("module:callable", kwargs); backends that
    offer ``spec()`` (RawFileBackend does) fill it in."""

    nsid: int
    backend: BlockBackend
    lba_size: int = 0
    spec: tuple[str, dict[str, Any]] | None = field(default=None)

    def __post_init__(self) -> None:
        if not 1 <= self.nsid < 0xFFFF_FFFF:
            raise ConfigError(f"namespace ID {self.nsid} is out of range")
        if not self.lba_size:
            self.lba_size = max(512, self.backend.block_size)
        if self.lba_size not in (512, 4096) or self.lba_size < self.backend.block_size:
            raise ConfigError(f"namespace {self.nsid}: LBA size {self.lba_size} does not "
                              f"suit a backend with {self.backend.block_size}-byte blocks")
        self.lba_shift = self.lba_size.bit_length() - 1
        self.nlb = self.backend.size >> self.lba_shift
        if self.nlb == 0:
            raise ConfigError(f"namespace {self.nsid}: backend smaller than one block")
        if self.spec is None and hasattr(self.backend, "spec"):
            self.spec = self.backend.spec()

    @property
    def read_only(self) -> bool:
        return bool(self.backend.read_only)

    def uid(self, serial: str) -> bytes:
        """16 stable bytes for NGUID (and the first 8 for EUI-64)."""
        return hashlib.sha256(f"{serial}/{self.nsid}".encode()).digest()[:16]

    def identify(self, serial: str) -> bytes:
        """Identify Namespace data structure (CNS 00h), 4096 bytes."""
        out = bytearray(IDENTIFY_SIZE)
        struct.pack_into("<QQQ", out, 0, self.nlb, self.nlb, self.nlb)
        out[0x18] = 0            # NSFEAT: no thin provisioning reported
        out[0x19] = 0            # NLBAF: one format (0-based)
        out[0x1A] = 0            # FLBAS: format 0, no metadata
        out[0x21] = 0x08         # DLFEAT: Write Zeroes may deallocate; reads of
                                 # deallocated blocks are not reported as zeros
        uid = self.uid(serial)
        out[0x68:0x78] = uid     # NGUID
        out[0x78:0x80] = uid[:8]  # EUI64
        struct.pack_into("<HBB", out, 0x80, 0, self.lba_shift, 0)   # LBAF0
        return bytes(out)

    def descriptors(self, serial: str) -> bytes:
        """Namespace Identification Descriptor list (CNS 03h)."""
        out = bytearray(IDENTIFY_SIZE)
        uid = self.uid(serial)
        out[0:4] = bytes([1, 8, 0, 0])       # NIDT 1: EUI-64
        out[4:12] = uid[:8]
        out[12:16] = bytes([2, 16, 0, 0])    # NIDT 2: NGUID
        out[16:32] = uid
        return bytes(out)
