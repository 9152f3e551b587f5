"""Reading and writing the files users name, without surprises.

A path a user typed may be a directory, a device that never ends
(/dev/zero), unreadable, or on a full disk. Reads take regular files only
and never more than their size; writes go to a temporary file in the same
directory and are renamed over the target only when complete, so a failed
write loses nothing.
"""
from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from typing import IO, Iterator

from hvkit.errors import GuestLoadError, HvkitError


def _why(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower()


def check_regular(path: str | os.PathLike, what: str,
                  error: type[HvkitError] = GuestLoadError) -> os.stat_result:
    """stat() a path and refuse anything but a readable regular file."""
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except OSError as exc:
        raise error(f"{p}: cannot read {what}: {_why(exc)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{p}: is a directory, not a {what}")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{p}: is not a regular file (a {what} must be one)")
    if not os.access(p, os.R_OK):
        raise error(f"{p}: cannot read {what}: permission denied")
    return st


def read_regular(path: str | os.PathLike, what: str, *, limit: int | None = None,
                 error: type[HvkitError] = GuestLoadError) -> bytes:
    """The bytes of a regular file, refusing directories, devices, pipes
    and files larger than ``limit``; at most the size stat() reported is
    read, so a file that grows meanwhile cannot make us read forever."""
    p = os.fspath(path)
    st = check_regular(p, what, error)
    if limit is not None and st.st_size > limit:
        raise error(f"{p}: {what} is {st.st_size} bytes; the limit is {limit}")
    try:
        with open(p, "rb") as f:
            return f.read(st.st_size)
    except OSError as exc:
        raise error(f"{p}: cannot read {what}: {_why(exc)}") from None


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, what: str = "file", *, mode: int = 0o644,
                 error: type[HvkitError] = HvkitError) -> Iterator[IO[bytes]]:
    """Write a file whole or not at all: to a temporary file beside
    ``path``, fsynced and renamed over it on success; removed on failure."""
    p = os.fspath(path)
    d = os.path.dirname(os.path.abspath(p))
    if os.path.isdir(p):
        raise error(f"{p}: is a directory; cannot write the {what} there")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(p)}.", suffix=".tmp", dir=d)
    except OSError as exc:
        raise error(f"{p}: cannot write {what}: {_why(exc)}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode & ~_umask())
        os.replace(tmp, p)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise error(f"{p}: cannot write {what}: {_why(exc)}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old
