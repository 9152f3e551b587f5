"""Locks that keep two processes from writing one volume at once.

A volume opened for writing holds an exclusive ``flock`` on its file, a
reader a shared one; both are taken without waiting, so a second writer
gets an error naming the process that holds the volume (found in
``/proc/locks``) instead of corrupting it. ``flock`` belongs to the open
file, so a second open in the same process is refused as well, and the
kernel drops the lock when the holder exits or is killed.
"""
from __future__ import annotations

import fcntl
import os

from hvkit.storage.backend import StorageError


def holders(fd: int) -> list[int]:
    """PIDs holding a flock on the file open as ``fd`` (empty if unknown)."""
    st = os.fstat(fd)
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    try:
        with open("/proc/locks") as fh:
            for line in fh:
                parts = line.split()
                if "->" in parts:
                    continue  # a waiter, not a holder
                if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == ident:
                    pids.append(int(parts[4]))
    except (OSError, ValueError):
        pass
    return pids


def lock_volume(fd: int, path: str, *, exclusive: bool) -> None:
    """Take the volume's lock or raise ``StorageError`` naming the holder."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        pids = holders(fd)
        who = f"PID {', '.join(map(str, sorted(set(pids))))}" if pids else "another process"
        raise StorageError(f"volume {path!r} is in use by {who}"
                           + ("" if exclusive else " (open for writing)")) from None
    except OSError as e:
        raise StorageError(f"cannot lock volume {path!r}: {e.strerror}") from e
