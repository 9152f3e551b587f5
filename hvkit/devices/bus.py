"""Port-I/O and MMIO buses: map an address to a device and an offset.

Devices never see KVM. A device is any object with ``read(offset, size)``
returning ``size`` bytes and ``write(offset, data)``; the run loop resolves
an exit to (device, offset) here.
"""
from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from typing import Callable, Protocol, runtime_checkable

from hvkit.errors import ConfigError, HvkitError


class DeviceReplyError(HvkitError, RuntimeError):
    """A device answered a read with something other than exactly the
    bytes asked for: a bug in the device, refused before the guest sees it."""


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

    Lookups never take a lock: the mappings are an immutable table that
    ``register``/``unregister`` replace in one assignment (under a writers'
    lock), so a vCPU dispatching while another thread moves a BAR sees the
    old table or the new one, never a mix.

    An access reaches a device only if it lies wholly inside the device's
    range (``offset + size <= length``). One that starts outside every range
    or runs past the end of its range is unhandled: reads return all ones,
    writes are dropped, and both are counted (``unhandled``, and
    ``straddling`` for the ones that ran past an end).
    """

    def __init__(self, name: str = "bus") -> None:
        self.name = name
        self._table: tuple[tuple[int, ...], tuple[Mapping, ...]] = ((), ())
        self._writer = threading.Lock()
        self.unhandled = 0
        self.straddling = 0
        #: called with each Mapping taken off the bus, so whoever serves the
        #: same range elsewhere (a VMM's native run loop) stops serving it too
        self.unregister_listeners: list[Callable[[Mapping], None]] = []

    def register(self, base: int, length: int, device: Device,
                 name: str | None = None) -> Mapping:
        if isinstance(base, bool) or not isinstance(base, int) or base < 0:
            raise ConfigError(f"{self.name}: base must be a non-negative integer, got {base!r}")
        if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
            raise ConfigError(f"{self.name}: device length must be positive, got {length!r}")
        label = name or type(device).__name__
        mapping = Mapping(base, length, device, label)
        with self._writer:
            bases, maps = self._table
            for m in maps:
                if base < m.end and m.base < base + length:
                    raise ConfigError(
                        f"{self.name}: {label} at [{base:#x}, {base + length:#x}) overlaps "
                        f"{m.name} at [{m.base:#x}, {m.end:#x})")
            i = bisect.bisect_left(bases, base)
            self._table = (bases[:i] + (base,) + bases[i:], maps[:i] + (mapping,) + maps[i:])
        return mapping

    def unregister(self, device: Device, base: int | None = None) -> None:
        with self._writer:
            bases, maps = self._table
            for i, m in enumerate(maps):
                if m.device is device and (base is None or m.base == base):
                    self._table = (bases[:i] + bases[i + 1:], maps[:i] + maps[i + 1:])
                    break
            else:
                raise ConfigError(f"{self.name}: device {device!r} is not registered")
        for listener in list(self.unregister_listeners):
            listener(m)

    def find(self, addr: int) -> Mapping | None:
        """The mapping whose range holds ``addr``, or None."""
        bases, maps = self._table
        i = bisect.bisect_right(bases, addr) - 1
        if i >= 0:
            m = maps[i]
            if m.base <= addr < m.end:
                return m
        return None

    def _route(self, addr: int, size: int) -> Mapping | None:
        m = self.find(addr)
        if m is None:
            self.unhandled += 1
            return None
        if addr + size > m.end:
            self.unhandled += 1
            self.straddling += 1
            return None
        return m

    def read(self, addr: int, size: int) -> bytes:
        """Unmapped (or straddling) reads return all ones, as an open bus does."""
        if size <= 0:
            raise ValueError(f"{self.name}: read of {size} bytes at {addr:#x}")
        m = self._route(addr, size)
        if m is None:
            return b"\xff" * size
        with m.lock:
            data = m.device.read(addr - m.base, size)
        if type(data) is not bytes:
            try:
                data = memoryview(data).cast("B").tobytes()
            except (TypeError, ValueError):
                raise DeviceReplyError(f"{m.name}.read returned a {type(data).__name__} for "
                                       f"a {size}-byte access, not bytes") from None
        if len(data) != size:
            raise DeviceReplyError(
                f"{m.name}.read returned {len(data)} bytes for a {size}-byte access")
        return data

    def write(self, addr: int, data: bytes) -> None:
        """Unmapped (or straddling) writes are dropped."""
        if not data:
            raise ValueError(f"{self.name}: empty write at {addr:#x}")
        m = self._route(addr, len(data))
        if m is None:
            return
        with m.lock:
            m.device.write(addr - m.base, data)

    def __iter__(self):
        return iter(self._table[1])
