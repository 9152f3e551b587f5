"""The configuration-space register model: bytes plus per-byte write masks.

Each byte has a write mask (bits the guest may change) and a
write-1-to-clear mask, as QEMU's model does; read-only identity fields,
BAR size bits and hard-wired zeros all fall out of the masks, so a guest
write can never set a bit the device did not declare writable.
"""
from __future__ import annotations

import struct

from hvkit.devices.pci import constants as C
from hvkit.errors import ConfigError


class ConfigSpace:
    """256 bytes (conventional) or 4096 bytes (PCI Express) of registers."""

    def __init__(self, size: int = C.CONFIG_SPACE_SIZE) -> None:
        if size not in (C.CONFIG_SPACE_SIZE, C.EXT_CONFIG_SPACE_SIZE):
            raise ConfigError(f"config space size must be 256 or 4096, got {size}")
        self.size = size
        self.data = bytearray(size)
        self.wmask = bytearray(size)
        self.w1cmask = bytearray(size)
        self._cap_tail = -1   # offset of the last capability's "next" byte

    # -- device-side accessors (not masked) --------------------------------

    def set_u8(self, offset: int, value: int) -> None:
        self.data[offset] = value & 0xFF

    def set_u16(self, offset: int, value: int) -> None:
        struct.pack_into("<H", self.data, offset, value & 0xFFFF)

    def set_u32(self, offset: int, value: int) -> None:
        struct.pack_into("<I", self.data, offset, value & 0xFFFFFFFF)

    def get_u8(self, offset: int) -> int:
        return self.data[offset]

    def get_u16(self, offset: int) -> int:
        return struct.unpack_from("<H", self.data, offset)[0]

    def get_u32(self, offset: int) -> int:
        return struct.unpack_from("<I", self.data, offset)[0]

    def set_wmask(self, offset: int, mask: int, width: int) -> None:
        self.wmask[offset:offset + width] = (mask & ((1 << (8 * width)) - 1)).to_bytes(width, "little")

    def set_w1cmask(self, offset: int, mask: int, width: int) -> None:
        self.w1cmask[offset:offset + width] = (mask & ((1 << (8 * width)) - 1)).to_bytes(width, "little")

    # -- guest-side accessors (masked) --------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        """Bytes beyond the space read as ones (an open bus)."""
        if offset < 0 or size <= 0:
            return b"\xff" * max(size, 0)
        inside = self.data[offset:min(offset + size, self.size)]
        return bytes(inside) + b"\xff" * (size - len(inside))

    def write(self, offset: int, data: bytes) -> None:
        """Apply a guest write through the masks; bytes outside are dropped."""
        for i, value in enumerate(data):
            pos = offset + i
            if not 0 <= pos < self.size:
                continue
            wm = self.wmask[pos]
            w1c = self.w1cmask[pos]
            cur = self.data[pos]
            cur = (cur & ~wm) | (value & wm)
            cur &= ~(value & w1c)
            self.data[pos] = cur & 0xFF

    # -- capabilities -------------------------------------------------------

    def add_capability(self, cap_id: int, body: bytes, offset: int | None = None) -> int:
        """Append a capability (``body`` excludes the 2-byte header) to the
        list and return its offset. Offsets are dword-aligned and above the
        header; capability bytes are read-only until the caller sets masks."""
        length = 2 + len(body)
        if offset is None:
            offset = self._next_free()
        if offset < 0x40 or offset % 4 or offset + length > C.CONFIG_SPACE_SIZE:
            raise ConfigError(f"capability {cap_id:#x} does not fit at {offset:#x}")
        self.data[offset] = cap_id
        self.data[offset + 1] = 0
        self.data[offset + 2:offset + length] = body
        if self._cap_tail < 0:
            self.data[C.CAPABILITY_LIST] = offset
        else:
            self.data[self._cap_tail] = offset
        self._cap_tail = offset + 1
        self.data[C.STATUS] |= C.STATUS_CAP_LIST
        self._used_until = offset + length
        return offset

    def _next_free(self) -> int:
        end = getattr(self, "_used_until", 0x40)
        return max(0x40, (end + 3) & ~3)

    def capabilities(self) -> list[tuple[int, int]]:
        """(id, offset) of each capability, walking the list as a guest does."""
        out = []
        seen = set()
        pos = self.data[C.CAPABILITY_LIST] & ~3 if self.data[C.STATUS] & C.STATUS_CAP_LIST else 0
        while pos and pos not in seen:
            seen.add(pos)
            out.append((self.data[pos], pos))
            pos = self.data[pos + 1] & ~3
        return out
