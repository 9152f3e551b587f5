"""A raw disk image file as a ``BlockBackend``.

The file is opened with O_DIRECT where the file system allows it, so guest
I/O bypasses the host page cache (the guest has its own cache, and a second
copy wastes memory and hides the device's real latency). O_DIRECT needs the
buffer address, file offset and length aligned to the device's logical block
size: guest memory views are page-aligned mmap memory, so an aligned guest
request goes straight from guest RAM to the file; an unaligned one goes
through an aligned bounce buffer (read-modify-write for partial blocks).
File systems without O_DIRECT (tmpfs, some overlays) fall back to buffered
I/O and say so in ``note``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import threading
from typing import Any

from hvkit.storage.backend import StorageError

log = logging.getLogger(__name__)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_BOUNCE_CHUNK = 1 << 20

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def _address(buf: memoryview) -> int | None:
    """Host address of a writable buffer, or None if it has none we can see."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(buf))
    except (TypeError, ValueError):
        return None


class RawFileBackend:
    """A regular file (or block device) holding the disk's bytes one to one."""

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False,
                 direct: bool = True, block_size: int = 512) -> None:
        if block_size not in (512, 4096):
            raise StorageError(f"{path}: block size must be 512 or 4096, got {block_size}")
        self.path = os.fspath(path)
        self.read_only = read_only
        self.block_size = block_size
        self.note = ""
        self._lock = threading.Lock()
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        self.direct = False
        fd = -1
        if direct:
            try:
                fd = os.open(self.path, flags | os.O_DIRECT)
                self.direct = True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise StorageError(f"cannot open {self.path}: {exc.strerror}") from exc
                self.note = (f"{self.path}: the file system refuses O_DIRECT; "
                             f"using buffered I/O (host page cache)")
        if fd < 0:
            try:
                fd = os.open(self.path, flags)
            except OSError as exc:
                raise StorageError(f"cannot open {self.path}: {exc.strerror}") from exc
        self._fd = fd
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
        except OSError as exc:
            os.close(fd)
            raise StorageError(f"{self.path}: cannot find its size: {exc.strerror}") from exc
        self.size = end - end % block_size
        if self.size == 0:
            os.close(fd)
            raise StorageError(f"{self.path}: smaller than one {block_size}-byte block")
        self.align = self._probe_alignment() if self.direct else 1
        if self.direct and self.align == 0:
            # O_DIRECT opened but every probe failed: behave as buffered.
            os.close(self._fd)
            self._fd = os.open(self.path, flags)
            self.direct = False
            self.align = 1
            self.note = (f"{self.path}: O_DIRECT reads fail on this file system; "
                         f"using buffered I/O (host page cache)")
        if self.note:
            log.info("%s", self.note)
        self._bounce = mmap.mmap(-1, _BOUNCE_CHUNK + max(self.align, 4096))

    @classmethod
    def create(cls, path: str | os.PathLike[str], size: int, **kwargs: Any) -> "RawFileBackend":
        """Create (or resize) a sparse image file of ``size`` bytes and open it."""
        fd = os.open(os.fspath(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        return cls(path, **kwargs)

    def spec(self) -> tuple[str, dict[str, Any]]:
        """How another process opens the same disk (the NVMe accelerator)."""
        return ("hvkit.storage.raw:RawFileBackend",
                {"path": self.path, "read_only": self.read_only,
                 "direct": self.direct, "block_size": self.block_size})

    def _probe_alignment(self) -> int:
        probe = mmap.mmap(-1, 4096)
        try:
            view = memoryview(probe)
            for align in (512, 4096):
                try:
                    os.preadv(self._fd, [view[:align]], 0)
                    return align
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise StorageError(
                            f"{self.path}: probe read failed: {exc.strerror}") from exc
            return 0
        finally:
            view.release()
            probe.close()

    # -- checks ---------------------------------------------------------

    def _check(self, offset: int, length: int, writing: bool) -> None:
        if self._fd < 0:
            raise StorageError(f"{self.path}: backend is closed")
        if writing and self.read_only:
            raise StorageError(f"{self.path}: backend is read-only")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise StorageError(
                f"{self.path}: range [{offset:#x}, {offset + length:#x}) is outside "
                f"the disk (size {self.size:#x})")

    def _aligned(self, offset: int, buf: memoryview) -> bool:
        if not self.direct:
            return True
        a = self.align
        if offset % a or buf.nbytes % a:
            return False
        addr = _address(buf)
        return addr is not None and addr % a == 0

    # -- I/O --------------------------------------------------------------

    def _pread_full(self, buf: memoryview, offset: int) -> None:
        done = 0
        while done < buf.nbytes:
            n = os.preadv(self._fd, [buf[done:]], offset + done)
            if n == 0:
                buf[done:] = bytes(buf.nbytes - done)
                return
            done += n

    def _pwrite_full(self, buf: memoryview, offset: int) -> None:
        done = 0
        while done < buf.nbytes:
            done += os.pwritev(self._fd, [buf[done:]], offset + done)

    def readinto(self, offset: int, buf: memoryview) -> None:
        buf = memoryview(buf).cast("B")
        self._check(offset, buf.nbytes, False)
        try:
            if self._aligned(offset, buf):
                self._pread_full(buf, offset)
                return
            with self._lock:
                self._bounced(offset, buf, None)
        except OSError as exc:
            raise StorageError(f"{self.path}: read at {offset:#x} failed: {exc.strerror}") from exc

    def write(self, offset: int, data: memoryview | bytes) -> None:
        data = memoryview(data).cast("B")
        self._check(offset, data.nbytes, True)
        try:
            if self._aligned(offset, data):
                self._pwrite_full(data, offset)
                return
            with self._lock:
                self._bounced(offset, None, data)
        except OSError as exc:
            raise StorageError(f"{self.path}: write at {offset:#x} failed: {exc.strerror}") from exc

    def _bounced(self, offset: int, out: memoryview | None, data: memoryview | None) -> None:
        """Unaligned I/O through the aligned bounce buffer, chunk by chunk."""
        a = self.align
        total = (out if out is not None else data).nbytes  # type: ignore[union-attr]
        done = 0
        bounce = memoryview(self._bounce)
        try:
            while done < total:
                pos = offset + done
                start = pos - pos % a
                n = min(total - done, _BOUNCE_CHUNK - (pos - start))
                end = pos + n
                end_al = -(-end // a) * a
                span = bounce[:end_al - start]
                if out is not None:
                    self._pread_full(span, start)
                    out[done:done + n] = span[pos - start:pos - start + n]
                else:
                    if pos != start or end != end_al:
                        self._pread_full(span, start)
                    span[pos - start:pos - start + n] = data[done:done + n]  # type: ignore[index]
                    self._write_span(span, start)
                done += n
        finally:
            bounce.release()

    def _write_span(self, span: memoryview, start: int) -> None:
        """Write an aligned span of the bounce buffer. At the end of a file
        whose size is not a multiple of the alignment, O_DIRECT can only
        write whole aligned blocks, so the write runs past the end of the
        file; cut the file back to its size, or the disk would grow."""
        end = start + span.nbytes
        file_end = os.fstat(self._fd).st_size if end > self.size else end
        self._pwrite_full(span, start)
        if end > file_end:
            os.ftruncate(self._fd, file_end)

    def flush(self) -> None:
        if self._fd < 0:
            raise StorageError(f"{self.path}: backend is closed")
        if self.read_only:
            return
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise StorageError(f"{self.path}: flush failed: {exc.strerror}") from exc

    def _fallocate(self, mode: int, offset: int, length: int) -> bool:
        if _fallocate(self._fd, mode, offset, length) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
            return False
        raise StorageError(f"{self.path}: fallocate failed: {os.strerror(err)}")

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check(offset, length, True)
        if length == 0:
            return
        if self._fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length):
            return
        if self._fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
            return
        zeros = mmap.mmap(-1, min(length, _BOUNCE_CHUNK))
        try:
            view = memoryview(zeros)
            done = 0
            while done < length:
                n = min(length - done, len(zeros))
                self.write(offset + done, view[:n])
                done += n
            view.release()
        finally:
            zeros.close()

    def discard(self, offset: int, length: int) -> None:
        """Punch a hole where the file system can; otherwise keep the data
        (discard is advisory, the caller must not rely on zeros)."""
        self._check(offset, length, True)
        if length:
            self._fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if not self._bounce.closed:
            self._bounce.close()

    def __enter__(self) -> "RawFileBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "direct" if self.direct else "buffered"
        return f"RawFileBackend({self.path!r}, size={self.size}, {mode})"
