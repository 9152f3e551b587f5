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
    pci = [e for e in entries if e[0] == 3 and e[4] == 0]
    assert len(pci) == 1 and pci[0][5] == (1 << 2) and pci[0][7] == 16
    with pytest.raises(ConfigError):
        build_mptable(1, pci_irqs=[(40, 0, 16)])
    with pytest.raises(ConfigError):
        build_mptable(0)


def buses(entries):
    return {e[1]: e[2:8] for e in entries if e[0] == 1}


def test_mptable_pci_bus_is_linux_pci_bus_0():
    """Linux looks a PCI function's INTx up by its PCI bus number, which
    must be the MP bus ID of a bus of type "PCI" (bus 0 is the root bus):
    with ISA on ID 0 it finds "nonexistent PCI bus 0" and reports "can't
    find IRQ for PCI INT A; probably buggy MP table"."""
    entries = parse(build_mptable(2, pci_irqs=[(1, 0, 17), (2, 1, 18), (3, 3, 19)]))
    b = buses(entries)
    assert b[0] == b"PCI   "
    isa_ids = [i for i, name in b.items() if name == b"ISA   "]
    assert len(isa_ids) == 1 and isa_ids[0] != 0
    ioapic_id = [e for e in entries if e[0] == 2][0][1]
    ints = [e for e in entries if e[0] == 3]
    pci = [(e[5] >> 2, e[5] & 3, e[7]) for e in ints if e[4] == 0]
    assert pci == [(1, 0, 17), (2, 1, 18), (3, 3, 19)]
    assert all(e[6] == ioapic_id for e in ints)
    for e in ints:
        flags = struct.unpack_from("<H", e, 2)[0]
        if e[4] == 0:
            assert flags == 0x0F                      # PCI: level, active low
    isa = [(e[5], e[7]) for e in ints if e[4] == isa_ids[0]]
    assert isa == [(i, i) for i in range(16)]
    local = [e for e in entries if e[0] == 4]
    assert all(e[4] == isa_ids[0] for e in local)   # ExtINT and NMI stay on ISA


def test_mptable_without_pci_keeps_isa_on_bus_0():
    b = buses(parse(build_mptable(1)))
    assert b == {0: b"ISA   "}
