"""The guest's physical memory map (e820), as Linux and PVH guests read it."""
from __future__ import annotations

from typing import TYPE_CHECKING

from hvkit.arch.x86 import layout

if TYPE_CHECKING:
    from hvkit.memory.guest import GuestMemory

E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_NVS = 4
E820_UNUSABLE = 5

# The top of conventional memory: the last KiB below 640 KiB holds the MP
# table, and 640 KiB - 1 MiB is the legacy video/BIOS hole.
EBDA_START = 0x9FC00


def e820_map(memory: "GuestMemory") -> list[tuple[int, int, int]]:
    """(address, size, type) entries covering guest RAM, with the legacy
    hole below 1 MiB reserved."""
    out: list[tuple[int, int, int]] = []
    for region in memory:
        start, end = region.gpa, region.end
        if start < layout.HIMEM_START:
            low_end = min(end, EBDA_START)
            if low_end > start:
                out.append((start, low_end - start, E820_RAM))
            if end > EBDA_START:
                out.append((EBDA_START, layout.HIMEM_START - EBDA_START, E820_RESERVED))
            start = max(start, layout.HIMEM_START)
        if end > start:
            out.append((start, end - start, E820_RAM))
    return out
