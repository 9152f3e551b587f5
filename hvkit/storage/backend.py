"""The interface every disk backend offers to device models (NVMe, virtio-blk).

Offsets and lengths are in bytes. Device models check guest-supplied ranges
against ``size`` before calling; backends check again and raise
``StorageError`` rather than touch anything outside the disk.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from hvkit.errors import HvkitError


class StorageError(HvkitError, OSError):
    """A backend could not do the I/O asked of it (the message says why)."""


@runtime_checkable
class BlockBackend(Protocol):
    #: Capacity in bytes.
    size: int
    #: Smallest unit of I/O the backend supports (512 or 4096).
    block_size: int
    read_only: bool

    def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` (may be a view of guest memory) from ``offset``."""

    def write(self, offset: int, data: memoryview | bytes) -> None:
        """Write ``data`` at ``offset``; durable only after ``flush``."""

    def flush(self) -> None:
        """Make every completed write durable."""

    def write_zeroes(self, offset: int, length: int) -> None: ...

    def discard(self, offset: int, length: int) -> None:
        """The range may read back as zeros afterwards; data is not needed."""

    def close(self) -> None: ...
