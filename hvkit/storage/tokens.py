"""I/O tokens and the I/O control part that issues them.

A token grants one software ID (a VM, a process) rights (read, write) on
one storage area (a disk and an LBA range) until an expiry time and for
one revocation epoch of that disk. It is authenticated with HMAC-SHA256
under a key that only the control part and the storage part hold:
``make_io_pair`` creates both around a fresh random key, which no public
attribute exposes. Revoking a disk bumps its epoch, which voids every
token issued for it before.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable

from hvkit.errors import ConfigError


RIGHT_READ = 1
RIGHT_WRITE = 2
RIGHTS = {"r": RIGHT_READ, "w": RIGHT_WRITE, "rw": RIGHT_READ | RIGHT_WRITE}

TOKEN_VERSION = 1
#: version, rights, id length, disk length, lba_start, lba_count, expires_ns, epoch, nonce
_FIXED = struct.Struct("<BBHHQQQI8s")
MAC_LEN = 32
ID_MAX = 255

Clock = Callable[[], int]


class TokenError(ConfigError):
    """A token could not be issued or parsed (the message says which field)."""


@dataclass(frozen=True)
class Token:
    software_id: bytes
    disk_id: bytes
    lba_start: int
    lba_count: int
    rights: int
    expires_ns: int
    epoch: int
    nonce: bytes
    mac: bytes = b""

    def body(self) -> bytes:
        return _FIXED.pack(TOKEN_VERSION, self.rights, len(self.software_id),
                           len(self.disk_id), self.lba_start, self.lba_count,
                           self.expires_ns, self.epoch, self.nonce) + self.software_id + self.disk_id

    def encode(self) -> bytes:
        return self.body() + self.mac

    @classmethod
    def decode(cls, raw: bytes) -> "Token":
        if not isinstance(raw, (bytes, bytearray)) or len(raw) < _FIXED.size + MAC_LEN:
            raise TokenError("malformed token: too short")
        ver, rights, nid, ndisk, start, count, exp, epoch, nonce = _FIXED.unpack_from(raw)
        if ver != TOKEN_VERSION:
            raise TokenError(f"malformed token: version {ver}, expected {TOKEN_VERSION}")
        if len(raw) != _FIXED.size + nid + ndisk + MAC_LEN:
            raise TokenError("malformed token: length does not match its fields")
        p = _FIXED.size
        return cls(bytes(raw[p:p + nid]), bytes(raw[p + nid:p + nid + ndisk]), start, count,
                   rights, exp, epoch, nonce, bytes(raw[-MAC_LEN:]))


def _mac(key: bytes, body: bytes) -> bytes:
    return hmac.digest(key, body, hashlib.sha256)


class EpochTable:
    """Current revocation epoch of each disk, shared by the two parts."""

    def __init__(self) -> None:
        self._epochs: dict[bytes, int] = {}
        self._lock = threading.Lock()

    def get(self, disk_id: bytes) -> int:
        return self._epochs.get(disk_id, 0)

    def bump(self, disk_id: bytes) -> int:
        with self._lock:
            e = self._epochs.get(disk_id, 0) + 1
            self._epochs[disk_id] = e
            return e


def _ident(value: str | bytes, what: str) -> bytes:
    raw = value.encode() if isinstance(value, str) else bytes(value)
    if not 1 <= len(raw) <= ID_MAX:
        raise TokenError(f"{what} must be 1..{ID_MAX} bytes, got {len(raw)}")
    return raw


class IOControl:
    """The I/O control part: issues and revokes tokens."""

    def __init__(self, key: bytes, epochs: EpochTable, clock: Clock = time.time_ns) -> None:
        if len(key) < 32:
            raise TokenError("the token key must be at least 32 bytes")
        self.__key = bytes(key)
        self.epochs = epochs
        self.clock = clock

    def issue(self, software_id: str | bytes, disk_id: str | bytes, lba_start: int,
              lba_count: int, rights: str | int = "rw", ttl: float = 3600.0) -> bytes:
        """A token for ``software_id`` on LBAs [lba_start, lba_start + lba_count)
        of ``disk_id``, valid for ``ttl`` seconds and the disk's current epoch."""
        sid, did = _ident(software_id, "software ID"), _ident(disk_id, "disk ID")
        r = RIGHTS.get(rights) if isinstance(rights, str) else rights
        if r is None or not 1 <= r <= 3:
            raise TokenError(f"rights {rights!r} must be 'r', 'w' or 'rw'")
        if not (0 <= lba_start < 1 << 63 and 0 < lba_count < 1 << 63):
            raise TokenError(f"storage area start {lba_start}, count {lba_count} "
                             f"is not a valid LBA range")
        if ttl <= 0:
            raise TokenError(f"token lifetime {ttl} s must be positive")
        tok = Token(sid, did, lba_start, lba_count, r, self.clock() + int(ttl * 1e9),
                    self.epochs.get(did), secrets.token_bytes(8))
        return tok.body() + _mac(self.__key, tok.body())

    def revoke_disk(self, disk_id: str | bytes) -> int:
        """Void every token issued so far for ``disk_id``; return the new epoch."""
        return self.epochs.bump(_ident(disk_id, "disk ID"))

