"""PCI bus 0: which function answers a configuration access."""
from __future__ import annotations

from typing import Callable, Iterator

from hvkit.devices.pci.device import PciDevice
from hvkit.errors import ConfigError

BusBarListener = Callable[[PciDevice, int, "int | None", "int | None"], None]


class PciBus:
    """Up to 32 slots x 8 functions on bus 0; absent functions read all ones."""

    def __init__(self) -> None:
        self._functions: dict[int, PciDevice] = {}
        self._listeners: list[BusBarListener] = []

    def add(self, device: PciDevice, slot: int | None = None, function: int = 0) -> int:
        """Plug ``device`` in and return its devfn (slot << 3 | function)."""
        if slot is None:
            slot = next((s for s in range(32) if (s << 3) not in self._functions), None)
            if slot is None:
                raise ConfigError("PCI bus 0 is full")
        if not 0 <= slot < 32 or not 0 <= function < 8:
            raise ConfigError(f"PCI slot {slot} function {function} out of range")
        devfn = slot << 3 | function
        if devfn in self._functions:
            raise ConfigError(f"PCI 00:{slot:02x}.{function} is taken by {self._functions[devfn]!r}")
        self._functions[devfn] = device
        device.add_bar_listener(lambda i, old, new, d=device: self._bar_changed(d, i, old, new))
        return devfn

    def add_bar_listener(self, listener: BusBarListener) -> None:
        """Hear ``(device, bar_index, old, new)`` for every device on the bus."""
        self._listeners.append(listener)

    def _bar_changed(self, device: PciDevice, index: int, old: int | None, new: int | None) -> None:
        for listener in list(self._listeners):
            listener(device, index, old, new)

    def get(self, bus: int, devfn: int) -> PciDevice | None:
        if bus != 0:
            return None
        dev = self._functions.get(devfn)
        if dev is None and devfn & 7:
            return None
        return dev

    def config_read(self, bus: int, devfn: int, offset: int, size: int) -> bytes:
        dev = self.get(bus, devfn)
        if dev is None:
            return b"\xff" * size
        return dev.config_read(offset, size)

    def config_write(self, bus: int, devfn: int, offset: int, data: bytes) -> None:
        dev = self.get(bus, devfn)
        if dev is not None:
            dev.config_write(offset, data)

    def __iter__(self) -> Iterator[PciDevice]:
        return iter([self._functions[k] for k in sorted(self._functions)])

    def devfn_of(self, device: PciDevice) -> int:
        for devfn, dev in self._functions.items():
            if dev is device:
                return devfn
        raise ConfigError(f"{device!r} is not on this bus")
