"""Port-I/O and MMIO buses: map an address to a device and an offset.

Devices never see KVM. A device is any object with ``read(offset, size)``
returning ``size`` bytes and ``write(offset, data)``; the run loop resolves
an exit to (device, offset) here.
"""
from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from hvkit.errors import ConfigError


@runtime_checkable
class Device(Protocol):
    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


@dataclass
class Mapping:
    base: int
    length: int
    device: Device
    name: str
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def end(self) -> int:
        return self.base + self.length


class Bus:
    """A sorted set of non-overlapping address ranges.

    Each mapping has its own lock so that vCPU threads may reach different
    devices at once while one device sees one access at a time.
    """

    def __init__(self, name: str = "bus") -> None:
        self.name = name
        self._bases: list[int] = []
        self._maps: list[Mapping] = []
        self.unhandled = 0

    def register(self, base: int, length: int, device: Device,
                 name: str | None = None) -> Mapping:
        if length <= 0:
            raise ConfigError(f"{self.name}: device length must be positive, got {length}")
        label = name or type(device).__name__
        for m in self._maps:
            if base < m.end and m.base < base + length:
                raise ConfigError(
                    f"{self.name}: {label} at [{base:#x}, {base + length:#x}) overlaps "
                    f"{m.name} at [{m.base:#x}, {m.end:#x})")
        mapping = Mapping(base, length, device, label)
        i = bisect.bisect_left(self._bases, base)
        self._bases.insert(i, base)
        self._maps.insert(i, mapping)
        return mapping

    def unregister(self, device: Device, base: int | None = None) -> None:
        for i, m in enumerate(self._maps):
            if m.device is device and (base is None or m.base == base):
                del self._maps[i]
                del self._bases[i]
                return
        raise ConfigError(f"{self.name}: device {device!r} is not registered")

    def find(self, addr: int) -> Mapping | None:
        i = bisect.bisect_right(self._bases, addr) - 1
        if i >= 0:
            m = self._maps[i]
            if addr < m.end:
                return m
        return None

    def read(self, addr: int, size: int) -> bytes:
        """Unmapped reads return all ones, as an open bus does."""
        m = self.find(addr)
        if m is None:
            self.unhandled += 1
            return b"\xff" * size
        with m.lock:
            data = m.device.read(addr - m.base, size)
        if len(data) != size:
            raise RuntimeError(f"{m.name}.read returned {len(data)} bytes for a {size}-byte access")
        return data

    def write(self, addr: int, data: bytes) -> None:
        """Unmapped writes are dropped."""
        m = self.find(addr)
        if m is None:
            self.unhandled += 1
            return
        with m.lock:
            m.device.write(addr - m.base, data)

    def __iter__(self):
        return iter(list(self._maps))
