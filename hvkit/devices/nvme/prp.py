"""PRP (physical region page) walking, with every address checked.

A command's data buffer is described by PRP1, PRP2 and, for transfers over
two pages, a PRP list in guest memory. Every one of those comes from the
guest, so every page, list page and entry is checked here and a bad one
becomes an NVMe status, never an exception or an access outside guest RAM.
"""
from __future__ import annotations

import struct

from hvkit.devices.nvme import spec as S
from hvkit.errors import GuestMemoryError
from hvkit.memory.guest import GuestMemory


class PrpError(Exception):
    """The PRPs are malformed; ``status`` is the NVMe status to return."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


def map_prps(mem: GuestMemory, prp1: int, prp2: int, length: int,
             page_size: int = S.PAGE_SIZE) -> list[tuple[int, int]]:
    """Return the buffer as [(gpa, length)] runs, each inside one memory
    region, adjacent pages merged; raise PrpError if anything is wrong."""
    if length <= 0:
        return []
    if prp1 & 0x3:
        raise PrpError(S.PRP_OFFSET_INVALID, "PRP1 is not dword aligned")
    pages: list[tuple[int, int]] = []
    first = min(length, page_size - (prp1 & (page_size - 1)))
    pages.append((prp1, first))
    left = length - first
    if left > 0:
        if left <= page_size:
            if prp2 & (page_size - 1):
                raise PrpError(S.PRP_OFFSET_INVALID, "PRP2 has a page offset")
            pages.append((prp2, left))
        else:
            _walk_list(mem, prp2, left, page_size, pages)
    runs: list[tuple[int, int]] = []
    for gpa, n in pages:
        try:
            region = mem.region_of(gpa, n)
        except GuestMemoryError:
            raise PrpError(S.DATA_TRANSFER_ERROR,
                           f"data page {gpa:#x}+{n} is outside guest RAM") from None
        if runs and runs[-1][0] + runs[-1][1] == gpa and region.contains(runs[-1][0], runs[-1][1] + n):
            runs[-1] = (runs[-1][0], runs[-1][1] + n)
        else:
            runs.append((gpa, n))
    return runs


def _walk_list(mem: GuestMemory, list_addr: int, left: int, page_size: int,
               pages: list[tuple[int, int]]) -> None:
    if list_addr & 0x7:
        raise PrpError(S.PRP_OFFSET_INVALID, "PRP list pointer is not qword aligned")
    needed = -(-left // page_size)
    addr = list_addr
    while needed:
        # entries available in this list page; the last one chains on if more follow
        room = (page_size - (addr & (page_size - 1))) // 8
        count = needed if needed <= room else room
        try:
            raw = mem.read(addr, count * 8)
        except GuestMemoryError:
            raise PrpError(S.DATA_TRANSFER_ERROR,
                           f"PRP list at {addr:#x} is outside guest RAM") from None
        entries = struct.unpack(f"<{count}Q", raw)
        take = needed if needed <= room else room - 1
        for entry in entries[:take]:
            if entry & (page_size - 1):
                raise PrpError(S.PRP_OFFSET_INVALID, f"PRP entry {entry:#x} has a page offset")
            n = min(left, page_size)
            pages.append((entry, n))
            left -= n
        needed -= take
        if needed:
            nxt = entries[room - 1]
            if nxt & (page_size - 1):
                raise PrpError(S.PRP_OFFSET_INVALID, "chained PRP list pointer has an offset")
            if nxt == addr & ~(page_size - 1):
                raise PrpError(S.INVALID_FIELD, "PRP list chains to itself")
            addr = nxt
