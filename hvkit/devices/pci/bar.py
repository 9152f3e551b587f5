"""Base address registers: what a BAR is, and where the machine puts it."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

from hvkit.devices.bus import Device
from hvkit.devices.pci import constants as C
from hvkit.errors import ConfigError

if TYPE_CHECKING:
    from hvkit.devices.pci.device import PciDevice


class BarKind(enum.Enum):
    IO = "io"
    MEM32 = "mem32"
    MEM64 = "mem64"


@dataclass
class Bar:
    """One BAR: its size (a power of two), kind, and the region device that
    serves accesses at offsets within it."""

    index: int
    size: int
    kind: BarKind
    region: Device
    prefetchable: bool = False
    name: str = ""
    mapped_at: int | None = field(default=None)   # address the machine decodes, or None

    @property
    def flags(self) -> int:
        if self.kind is BarKind.IO:
            return C.BAR_IO
        f = C.BAR_MEM_TYPE_64 if self.kind is BarKind.MEM64 else 0
        if self.prefetchable:
            f |= C.BAR_MEM_PREFETCH
        return f

    @property
    def is_io(self) -> bool:
        return self.kind is BarKind.IO


class BarAllocator:
    """Places BARs in the PCI windows, naturally aligned (firmware's job;
    a microVM has no firmware, so the machine does it before boot)."""

    def __init__(self, mmio_base: int = C.PCI_MMIO_BASE, mmio_end: int = C.PCI_MMIO_END,
                 io_base: int = C.PCI_IO_BASE, io_end: int = C.PCI_IO_END) -> None:
        self._mmio = [mmio_base, mmio_end]
        self._io = [io_base, io_end]

    def allocate(self, size: int, io: bool = False) -> int:
        window = self._io if io else self._mmio
        addr = -(-window[0] // size) * size
        if addr + size > window[1]:
            kind = "I/O" if io else "MMIO"
            raise ConfigError(f"PCI {kind} window full: no room for a {size:#x}-byte BAR")
        window[0] = addr + size
        return addr

    def assign(self, devices: Iterable["PciDevice"]) -> None:
        """Give every BAR of every device an address, largest first (least
        waste), and turn on memory/I/O decoding."""
        bars = [(dev, bar) for dev in devices for bar in dev.bars if bar is not None]
        bars.sort(key=lambda db: -db[1].size)
        for dev, bar in bars:
            dev.set_bar_address(bar.index, self.allocate(bar.size, bar.is_io))
        for dev in {id(d): d for d, _ in bars}.values():
            dev.enable_decoding()
