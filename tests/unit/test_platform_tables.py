import struct

import pytest

from hvkit.arch.x86.e820 import E820_RAM, E820_RESERVED, e820_map
from hvkit.arch.x86.mptable import MPTABLE_ADDR, build_mptable
from hvkit.errors import ConfigError
from hvkit.memory.guest import GuestMemory, MemoryRegion


def test_e820_reserves_the_legacy_hole():
    with GuestMemory.create(64 << 20) as mem:
        assert e820_map(mem) == [(0, 0x9FC00, E820_RAM),
                                 (0x9FC00, 0x100000 - 0x9FC00, E820_RESERVED),
                                 (0x100000, (64 << 20) - 0x100000, E820_RAM)]


def test_e820_with_ram_above_4g():
    mem = GuestMemory([MemoryRegion(0, 3 << 30), MemoryRegion(4 << 30, 1 << 30, name="hi")])
    try:
        m = e820_map(mem)
        assert m[-1] == (4 << 30, 1 << 30, E820_RAM)
        assert sum(s for _, s, t in m if t == E820_RAM) == (4 << 30) - 0x60400
    finally:
        mem.close()


def parse(table):
    sig, ptr, length, rev, csum = struct.unpack_from("<4sIBBB", table, 0)
    assert sig == b"_MP_" and length == 1 and rev == 4
    assert sum(table[:16]) & 0xFF == 0
    off = ptr - MPTABLE_ADDR
    sig, tlen, _, _ = struct.unpack_from("<4sHBB", table, off)
    assert sig == b"PCMP"
    assert sum(table[off:off + tlen]) & 0xFF == 0
    count = struct.unpack_from("<H", table, off + 34)[0]
    entries, p = [], off + 44
    for _ in range(count):
        kind = table[p]
        size = 20 if kind == 0 else 8
        entries.append(table[p:p + size])
        p += size
    assert p == off + tlen
    return entries


@pytest.mark.parametrize("ncpus", [1, 2, 8])
def test_mptable_lists_cpus_with_one_bsp(ncpus):
    entries = parse(build_mptable(ncpus))
    cpus = [e for e in entries if e[0] == 0]
    assert [c[1] for c in cpus] == list(range(ncpus))        # APIC IDs
    assert [c[3] & 2 for c in cpus].count(2) == 1            # one BSP
    ioapic = [e for e in entries if e[0] == 2][0]
    assert struct.unpack_from("<I", ioapic, 4)[0] == 0xFEC00000
    isa = [e for e in entries if e[0] == 3]
    assert [(e[5], e[7]) for e in isa] == [(i, i) for i in range(16)]


def test_mptable_pci_interrupts():
    entries = parse(build_mptable(1, pci_irqs=[(1, 0, 16)]))
    pci = [e for e in entries if e[0] == 3 and e[4] == 1]
    assert len(pci) == 1 and pci[0][5] == (1 << 2) and pci[0][7] == 16
    with pytest.raises(ConfigError):
        build_mptable(1, pci_irqs=[(40, 0, 16)])
    with pytest.raises(ConfigError):
        build_mptable(0)
