"""The storage part: every I/O request is checked against its software
ID, storage area and token before anything is read or written.

Device backends (the NVMe controller's, any other) are never handed a raw
``BlockBackend``: they get a ``GuardedBackend`` bound to one disk, one
software ID and one token, whose every method runs ``StoragePart.check``
first. A refusal raises ``AccessDenied`` and leaves an ``AuditRecord``.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from hvkit.storage.backend import BlockBackend, StorageError
from hvkit.storage.tokens import (MAC_LEN, RIGHT_READ, RIGHT_WRITE, Clock, EpochTable,
                                  IOControl, Token, TokenError, _ident)

log = logging.getLogger("hvkit.storage.audit")

OP_RIGHTS = {"read": RIGHT_READ, "write": RIGHT_WRITE, "flush": RIGHT_WRITE,
             "write_zeroes": RIGHT_WRITE, "discard": RIGHT_WRITE}
_VERIFIED_MAX = 4096


@dataclass(frozen=True)
class AuditRecord:
    time_ns: int
    software_id: str
    disk_id: str
    op: str
    offset: int
    length: int
    reason: str


class AccessDenied(StorageError):
    """The storage part refused a request; nothing was read or written."""

    def __init__(self, record: AuditRecord) -> None:
        super().__init__(f"{record.op} of {record.length} bytes at {record.offset} on disk "
                         f"{record.disk_id!r} by {record.software_id!r} refused: "
                         f"{record.reason}")
        self.record = record
        self.reason = record.reason


@dataclass
class _Disk:
    backend: BlockBackend
    lba_size: int


class StoragePart:
    def __init__(self, key: bytes, epochs: EpochTable, clock: Callable[[], int], *,
                 audit_limit: int = 10000) -> None:
        self.__key = bytes(key)
        self._epochs = epochs
        self._clock = clock
        self.__disks: dict[bytes, _Disk] = {}
        self._verified: dict[bytes, Token] = {}
        self.audit: deque[AuditRecord] = deque(maxlen=audit_limit)
        self.refused = 0
        self.accepted = 0
        self._lock = threading.Lock()

    def register_disk(self, disk_id: str | bytes, backend: BlockBackend, *,
                      lba_size: int = 512) -> None:
        """Put a backend under this part's control; from now on reach it only
        through ``bind``."""
        did = _ident(disk_id, "disk ID")
        if lba_size not in (512, 4096):
            raise StorageError(f"LBA size {lba_size} must be 512 or 4096")
        if did in self.__disks:
            raise StorageError(f"disk {did.decode(errors='replace')!r} is already registered")
        self.__disks[did] = _Disk(backend, lba_size)

    def bind(self, disk_id: str | bytes, software_id: str | bytes,
             token: bytes) -> "GuardedBackend":
        """A backend for one device: every request it makes is checked with
        ``software_id`` and ``token``."""
        did = _ident(disk_id, "disk ID")
        disk = self.__disks.get(did)
        if disk is None:
            raise StorageError(f"no disk {did.decode(errors='replace')!r} is registered")
        return GuardedBackend(self, did, _ident(software_id, "software ID"), bytes(token),
                              disk.backend.size, disk.backend.block_size,
                              disk.backend.read_only)

    def _refuse(self, sid: bytes, did: bytes, op: str, offset: int, length: int,
                reason: str) -> AccessDenied:
        rec = AuditRecord(self._clock(), sid.decode(errors="replace"),
                          did.decode(errors="replace"), op, offset, length, reason)
        with self._lock:
            self.audit.append(rec)
            self.refused += 1
        log.warning("refused %s", rec)
        return AccessDenied(rec)

    def _authentic(self, token: bytes) -> Token | str:
        tok = self._verified.get(token)
        if tok is not None:
            return tok
        try:
            tok = Token.decode(token)
        except TokenError as e:
            return str(e)
        expect = hmac.digest(self.__key, token[:-MAC_LEN], hashlib.sha256)
        if not hmac.compare_digest(expect, tok.mac):
            return "forged token: its MAC does not verify"
        if len(self._verified) >= _VERIFIED_MAX:
            self._verified.clear()
        self._verified[bytes(token)] = tok
        return tok

    def check(self, software_id: bytes, token: bytes, disk_id: bytes, op: str,
              offset: int, length: int, *, area: bool = True) -> BlockBackend:
        """Return the backend if the request is allowed; else audit and raise
        ``AccessDenied``. ``length`` is in bytes; ``area=False`` (an empty
        request) checks everything but the range. Identity comparisons are
        constant-time."""
        if (isinstance(offset, bool) or isinstance(length, bool)
                or not isinstance(offset, int) or not isinstance(length, int)):
            raise self._refuse(software_id, disk_id, op, 0, 0,
                               f"offset {offset!r} and length {length!r} must be integers")
        tok = self._authentic(token)
        if isinstance(tok, str):
            raise self._refuse(software_id, disk_id, op, offset, length, tok)
        if not hmac.compare_digest(tok.software_id, software_id):
            raise self._refuse(software_id, disk_id, op, offset, length,
                               "the token was issued to another software ID")
        if not hmac.compare_digest(tok.disk_id, disk_id):
            raise self._refuse(software_id, disk_id, op, offset, length,
                               "the token is for another disk")
        disk = self.__disks.get(disk_id)
        if disk is None:
            raise self._refuse(software_id, disk_id, op, offset, length, "unknown disk")
        if tok.epoch != self._epochs.get(disk_id):
            raise self._refuse(software_id, disk_id, op, offset, length,
                               "the token was revoked (disk epoch moved on)")
        if self._clock() >= tok.expires_ns:
            raise self._refuse(software_id, disk_id, op, offset, length,
                               "the token has expired")
        need = OP_RIGHTS.get(op)
        if need is None:
            raise self._refuse(software_id, disk_id, op, offset, length,
                               f"unknown operation {op!r}")
        if not tok.rights & need:
            raise self._refuse(software_id, disk_id, op, offset, length,
                               f"the token grants no {'read' if need == RIGHT_READ else 'write'} right")
        if op != "flush" and area:
            lo = tok.lba_start * disk.lba_size
            hi = lo + tok.lba_count * disk.lba_size
            if offset < lo or length < 0 or offset + length > hi:
                raise self._refuse(software_id, disk_id, op, offset, length,
                                   f"bytes [{offset}, {offset + length}) are outside the "
                                   f"token's area [{lo}, {hi})")
        self.accepted += 1
        return disk.backend


def _bytes_view(buf: object) -> memoryview:
    """The buffer as unsigned bytes: lengths are checked in bytes, never in
    items of whatever type the caller's buffer holds."""
    try:
        return memoryview(buf).cast("B")  # type: ignore[arg-type]
    except TypeError:
        raise StorageError(f"{type(buf).__name__} is not a contiguous buffer") from None


class GuardedBackend:
    """A ``BlockBackend`` that runs the storage part's check before each call."""

    def __init__(self, part: StoragePart, disk_id: bytes, software_id: bytes, token: bytes,
                 size: int, block_size: int, read_only: bool) -> None:
        self.__part = part
        self.__disk = disk_id
        self.__sid = software_id
        self.__token = token
        self.size = size
        self.block_size = block_size
        self.read_only = read_only

    @property
    def software_id(self) -> str:
        return self.__sid.decode(errors="replace")

    def _check(self, op: str, offset: int, length: int, *,
               area: bool = True) -> BlockBackend:
        return self.__part.check(self.__sid, self.__token, self.__disk, op, offset, length,
                                 area=area)

    def readinto(self, offset: int, buf: memoryview) -> None:
        view = _bytes_view(buf)
        self._check("read", offset, view.nbytes).readinto(offset, view)

    def write(self, offset: int, data: memoryview | bytes) -> None:
        view = _bytes_view(data)
        self._check("write", offset, view.nbytes).write(offset, view)

    def write_sg(self, sg) -> object:
        """Check every element, then hand the whole array over at once. An
        empty array is checked too (token, identity, write right)."""
        elements = [(_bytes_view(data), offset) for data, offset in sg]
        backend = self._check("write", 0, 0, area=False)
        for view, offset in elements:
            self._check("write", offset, view.nbytes)
        if not elements:
            return None
        if hasattr(backend, "write_sg"):
            return backend.write_sg(elements)
        for view, offset in elements:
            backend.write(offset, view)
        return None

    def flush(self) -> None:
        self._check("flush", 0, 0).flush()

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check("write_zeroes", offset, length).write_zeroes(offset, length)

    def discard(self, offset: int, length: int) -> None:
        self._check("discard", offset, length).discard(offset, length)

    def close(self) -> None:
        """Closing a guarded view leaves the disk itself open."""

    def rebind(self, token: bytes) -> None:
        """Swap in a fresh token (after expiry or revocation)."""
        self.__token = bytes(token)


def make_io_pair(clock: Clock = time.time_ns, *, audit_limit: int = 10000
                 ) -> tuple[IOControl, StoragePart]:
    """A control part and a storage part sharing a fresh key and epoch table."""
    key = secrets.token_bytes(32)
    epochs = EpochTable()
    return (IOControl(key, epochs, clock),
            StoragePart(key, epochs, clock, audit_limit=audit_limit))
