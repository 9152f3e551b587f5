"""ECAM: memory-mapped configuration space, 4 KiB per function.

Register on the MMIO bus at ``ECAM_BASE`` with length ``buses * ECAM_BUS_SIZE``
and describe it to the guest in the ACPI MCFG table.
"""
from __future__ import annotations

from hvkit.devices.pci import constants as C
from hvkit.devices.pci.bus import PciBus


class PciEcam:
    def __init__(self, bus: PciBus, buses: int = 1) -> None:
        self.bus = bus
        self.buses = buses

    @property
    def length(self) -> int:
        return self.buses * C.ECAM_BUS_SIZE

    def _decode(self, offset: int, size: int) -> tuple[int, int, int] | None:
        reg = offset & 0xFFF
        if size not in (1, 2, 4) or reg % size or not 0 <= offset < self.length:
            return None
        return offset >> 20, (offset >> 12) & 0xFF, reg

    def read(self, offset: int, size: int) -> bytes:
        t = self._decode(offset, size)
        if t is None:
            return b"\xff" * size
        return self.bus.config_read(t[0], t[1], t[2], size)

    def write(self, offset: int, data: bytes) -> None:
        t = self._decode(offset, len(data))
        if t is not None:
            self.bus.config_write(t[0], t[1], t[2], data)
