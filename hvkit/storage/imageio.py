"""Raw images in and out of a volume (``hvkit disk import|export``).

Both directions skip what holds no data: SEEK_DATA/SEEK_HOLE find the
allocated extents of the source, zero runs inside them are not written
(a disk block with no data stays a hole, and within a block only the
non-zero 64 KiB pieces are written), and export moves the bytes of each
mapped block with ``copy_file_range`` inside the kernel, leaving every
hole of the volume a hole in the raw file. An import marks its disk
incomplete until the last byte is in, and rolls it back if it fails; an
export writes a temporary file next to the target and renames it.
"""
from __future__ import annotations

import errno
import os
import stat
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

from hvkit.errors import HvkitError
from hvkit.storage.hostfile import data_extents
from hvkit.storage.volume import Volume

#: bytes read from the raw image per batched write: small enough that what
#: was read is still in the CPU cache when it is written
CHUNK = 2 << 20
#: granularity of zero detection inside a block
PIECE = 64 << 10
SECTOR = 512

Progress = Callable[[int, int], None]
_ZERO = bytes(PIECE)


def _open_source(path: str) -> tuple[int, int]:
    """An fd and the size of a raw image (a regular file or block device)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise HvkitError(f"cannot open raw image {path!r}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            size = st.st_size
        elif stat.S_ISBLK(st.st_mode):
            size = os.lseek(fd, 0, os.SEEK_END)
        else:
            raise HvkitError(f"raw image {path!r} is not a regular file or block device")
        if size == 0:
            raise HvkitError(f"raw image {path!r} is empty")
        return fd, size
    except BaseException:
        os.close(fd)
        raise


def _read_full(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < buf.nbytes:
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            raise HvkitError("the raw image shrank while being read")
        done += n


def _nonzero_runs(mv: memoryview, base: int) -> list[tuple[memoryview, int]]:
    """Scatter-gather elements for the non-zero PIECE-sized parts of ``mv``
    (which starts at disk offset ``base``), adjacent parts merged."""
    out: list[tuple[memoryview, int]] = []
    run = -1
    n = mv.nbytes
    for p in range(0, n, PIECE):
        q = min(p + PIECE, n)
        zero = mv[p:q].tobytes() == _ZERO[:q - p]
        if not zero and run < 0:
            run = p
        elif zero and run >= 0:
            out.append((mv[run:p], base + run))
            run = -1
    if run >= 0:
        out.append((mv[run:n], base + run))
    return out


def _chunks(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) pieces of at most CHUNK bytes covering the data."""
    for off, length in data_extents(fd, 0, size):
        pos = off
        while pos < off + length:
            n = min(CHUNK, off + length - pos)
            yield pos, n
            pos += n


def import_raw(vol: Volume, raw: str, name: str, progress: Progress | None = None) -> int:
    """Copy the raw image ``raw`` into a new disk ``name``; return its size
    (the image's size rounded up to a sector). The next chunk is read by a
    helper thread while this one is written (both release the GIL)."""
    fd, size = _open_source(raw)
    pool = ThreadPoolExecutor(1, thread_name_prefix="hvkit-import")
    try:
        disk_size = -(-size // SECTOR) * SECTOR
        fidx = vol.create_file(name, disk_size, incomplete=True)
        try:
            bufs = [memoryview(bytearray(CHUNK)), memoryview(bytearray(CHUNK))]
            chunks = _chunks(fd, size)

            def read(i: int, where: tuple[int, int] | None):
                if where is not None:
                    _read_full(fd, bufs[i][:where[1]], where[0])
                return where

            ahead = pool.submit(read, 0, next(chunks, None))
            i = 0
            while (where := ahead.result()) is not None:
                ahead = pool.submit(read, i ^ 1, next(chunks, None))
                pos, n = where
                sg = _nonzero_runs(bufs[i][:n], pos)
                if sg:  # the disk is incomplete: one commit at the end will do
                    vol.write_sg(fidx, sg, durable=False)
                if progress:
                    progress(pos + n, size)
                i ^= 1
            vol.mark_complete(fidx)
        except BaseException:
            try:
                vol.delete_file(fidx)
            except Exception:
                pass  # the disk stays marked incomplete; check --repair removes it
            raise
        if progress:
            progress(size, size)
        return disk_size
    finally:
        pool.shutdown(wait=True)
        os.close(fd)


def _copy(src: int, dst: int, length: int, src_off: int, dst_off: int) -> None:
    while length:
        try:
            n = os.copy_file_range(src, dst, length, src_off, dst_off)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            n = 0
        if n == 0:  # not supported here: copy through a buffer
            chunk = os.pread(src, min(length, 8 << 20), src_off)
            if not chunk:
                raise HvkitError("the volume file ended inside a mapped block")
            n = os.pwrite(dst, chunk, dst_off)
        length -= n
        src_off += n
        dst_off += n


def export_raw(vol: Volume, name: str, out: str, *, force: bool = False,
               progress: Progress | None = None) -> int:
    """Write disk ``name`` to the raw image ``out``; return its size."""
    fidx = vol.lookup(name)
    info = vol.file_info(fidx)
    if info.incomplete:
        raise HvkitError(f"disk {name!r} is incomplete: an import into it did not finish")
    if os.path.isdir(out):
        raise HvkitError(f"{out!r} is a directory")
    if os.path.lexists(out) and not force:
        raise HvkitError(f"{out!r} exists (use --force to overwrite)")
    folder = os.path.dirname(os.path.abspath(out))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(out)}.",
                               suffix=".part")
    try:
        os.fchmod(fd, 0o644 & ~_umask())
        os.ftruncate(fd, info.size)
        bs = vol.geom.block_size
        nblocks = -(-info.size // bs)
        src = vol.f.fd
        run = [0, 0, 0]  # src, dst, length: blocks laid out in order copy in one call
        with vol.lock:
            for fbi in range(nblocks):
                loc = vol.resolve(fidx, fbi)
                if loc is not None:
                    n = min(bs, info.size - fbi * bs, loc.length)
                    for off, length in data_extents(src, loc.offset, loc.offset + n):
                        dst = fbi * bs + off - loc.offset
                        if run[2] and run[0] + run[2] == off and run[1] + run[2] == dst:
                            run[2] += length
                            continue
                        if run[2]:
                            _copy(src, fd, run[2], run[0], run[1])
                        run = [off, dst, length]
                if progress and (fbi % 64 == 63 or fbi == nblocks - 1):
                    progress(min((fbi + 1) * bs, info.size), info.size)
            if run[2]:
                _copy(src, fd, run[2], run[0], run[1])
        os.fdatasync(fd)
        os.close(fd)
        fd = -1
        if force:
            os.replace(tmp, out)
        else:
            try:
                os.link(tmp, out)
            except FileExistsError:
                raise HvkitError(f"{out!r} exists (use --force to overwrite)") from None
            os.unlink(tmp)
        return info.size
    except BaseException:
        if fd >= 0:
            os.close(fd)
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
