"""The host file under a volume: positioned I/O, flushes, hole punching,
and the counters the benchmark reports.

All volume I/O goes through ``HostFile`` so that the counts of journal
writes and flushes are measured, not estimated, and so that tests can put
a fault-injecting file (``faults.CrashSimFile``) in its place.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
from dataclasses import dataclass, fields
from typing import Iterator

from hvkit.storage.backend import StorageError
from hvkit.storage.locking import lock_volume

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def data_extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the runs in [start, end) of the file open as
    ``fd`` that may hold data: holes are skipped with SEEK_DATA/SEEK_HOLE
    (everything counts as data where the file system cannot tell)."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: only a hole is left
                yield pos, end - pos
            return
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole - data
        pos = hole


@dataclass
class IOStats:
    """Counts of what actually reached the host file."""

    journal_writes: int = 0
    journal_bytes: int = 0
    flushes: int = 0
    data_writes: int = 0
    data_bytes: int = 0
    meta_writes: int = 0
    punches: int = 0
    checkpoints: int = 0
    transactions: int = 0
    logical_transactions: int = 0

    def snapshot(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0)


class HostFile:
    """A regular file opened for positioned I/O."""

    def __init__(self, path: str, *, create: bool = False, read_only: bool = False,
                 lock: bool = True) -> None:
        """Open ``path``; with ``lock``, exclusively for writing or shared for
        reading (see ``locking``), refusing a volume another open holds."""
        flags = os.O_RDONLY if read_only else os.O_RDWR
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        try:
            self.fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise StorageError(f"cannot open volume file {path!r}: {e.strerror}") from e
        try:
            if not stat.S_ISREG(os.fstat(self.fd).st_mode):
                raise StorageError(f"{path!r} is not a regular file")
            if lock:
                lock_volume(self.fd, path, exclusive=not read_only)
        except BaseException:
            os.close(self.fd)
            raise
        self.path = path
        self.read_only = read_only
        self.stats = IOStats()

    # -- reads ------------------------------------------------------------
    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) < length:  # beyond EOF of a sparse file reads as zeros
            data += bytes(length - len(data))
        return data

    def preadinto(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` (counted in bytes, whatever its item type); past the
        end of the file reads as zeros."""
        mv = memoryview(buf).cast("B")
        done = 0
        while done < mv.nbytes:
            n = os.preadv(self.fd, [mv[done:]], offset + done)
            if n == 0:
                mv[done:] = bytes(mv.nbytes - done)
                return
            done += n

    # -- writes -----------------------------------------------------------
    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        mv = memoryview(data).cast("B")
        done = 0
        while done < mv.nbytes:
            n = os.pwrite(self.fd, mv[done:], offset + done)
            if n <= 0:
                raise StorageError(f"short write to {self.path!r} at {offset + done}")
            done += n

    def punch(self, offset: int, length: int) -> None:
        """Deallocate a range so it reads as zeros and uses no space."""
        self.stats.punches += 1
        if _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                      offset, length) != 0:
            err = ctypes.get_errno()
            if err in (95,):  # EOPNOTSUPP: fall back to writing zeros
                self.pwrite(offset, bytes(length))
                return
            raise StorageError(f"fallocate(PUNCH_HOLE) on {self.path!r} failed: "
                               f"{os.strerror(err)}")

    def flush(self) -> None:
        self.stats.flushes += 1
        os.fdatasync(self.fd)

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
