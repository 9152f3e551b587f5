"""A virtual disk inside a volume, seen as a ``BlockBackend``.

This is what a device model (the NVMe controller) is handed, usually
wrapped in a ``GuardedBackend`` so every request is token-checked first.
"""
from __future__ import annotations

from typing import Sequence

from hvkit.storage.backend import StorageError
from hvkit.storage.volume import SGElement, Volume
from hvkit.storage.writepath import WriteResult


class VirtualDisk:
    """``BlockBackend`` over one file of a volume."""

    def __init__(self, volume: Volume, name: str, *, block_size: int = 512,
                 read_only: bool = False, owns_volume: bool = False) -> None:
        if block_size not in (512, 4096):
            raise StorageError(f"logical block size {block_size} must be 512 or 4096")
        self.volume = volume
        self.name = name
        self.index = volume.lookup(name)
        info = volume.file_info(self.index)
        if info.incomplete:
            raise StorageError(f"disk {name!r} is incomplete: an import into it did not "
                               f"finish (hvkit disk check --repair removes it)")
        self.size = info.size
        self.block_size = block_size
        self.read_only = read_only or volume.f.read_only
        self._owns = owns_volume

    @classmethod
    def open(cls, path: str, name: str, **kw: object) -> "VirtualDisk":
        """Open the volume at ``path`` and the disk ``name`` in it."""
        vol = Volume.open(path)
        try:
            return cls(vol, name, owns_volume=True, **kw)  # type: ignore[arg-type]
        except BaseException:
            vol.close()
            raise

    def _writable(self) -> None:
        if self.read_only:
            raise StorageError(f"disk {self.name!r} is read-only")

    def readinto(self, offset: int, buf: memoryview) -> None:
        self.volume.read(self.index, offset, buf)

    def write(self, offset: int, data: memoryview | bytes) -> None:
        self._writable()
        self.volume.write_sg(self.index, [(data, offset)])

    def write_sg(self, sg: Sequence[SGElement]) -> WriteResult:
        """Write a whole scatter-gather array as one batched transaction."""
        self._writable()
        return self.volume.write_sg(self.index, sg)

    def flush(self) -> None:
        self.volume.flush()

    def write_zeroes(self, offset: int, length: int) -> None:
        self._writable()
        self.volume.write_zeroes(self.index, offset, length)

    def discard(self, offset: int, length: int) -> None:
        self._writable()
        self.volume.discard(self.index, offset, length, zero=True)

    def close(self) -> None:
        if self._owns:
            self.volume.close()
