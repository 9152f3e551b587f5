"""Configuration mechanism #1: CONFIG_ADDRESS at 0xCF8, CONFIG_DATA at 0xCFC.

Register on the port-I/O bus at ``CONFIG_IO_PORT_BASE`` with length 8.
"""
from __future__ import annotations

import struct

from hvkit.devices.pci.bus import PciBus

ENABLE = 1 << 31


class PciConfigIo:
    """The two 32-bit ports; byte and word data accesses work as on real
    chipsets, and extended registers use the AMD bits 27:24 of the address."""

    def __init__(self, bus: PciBus) -> None:
        self.bus = bus
        self.address = 0

    def _target(self, port_offset: int, size: int) -> tuple[int, int, int] | None:
        a = self.address
        if not a & ENABLE:
            return None
        byte = port_offset - 4
        if byte + size > 4:
            return None
        reg = (a & 0xFC) | ((a >> 16) & 0xF00)
        return (a >> 16) & 0xFF, (a >> 8) & 0xFF, reg + byte

    def read(self, offset: int, size: int) -> bytes:
        if offset < 4:
            if offset == 0 and size == 4:
                return struct.pack("<I", self.address)
            return b"\xff" * size
        target = self._target(offset, size)
        if target is None:
            return b"\xff" * size
        return self.bus.config_read(target[0], target[1], target[2], size)

    def write(self, offset: int, data: bytes) -> None:
        if offset < 4:
            if offset == 0 and len(data) == 4:
                self.address = struct.unpack("<I", data)[0] & 0x8FFF_FFFC
            return
        target = self._target(offset, len(data))
        if target is not None:
            self.bus.config_write(target[0], target[1], target[2], data)
