import struct

import pytest

from hvkit.arch.x86 import layout
from hvkit.arch.x86.cpuid import build_cpuid, find, has_feature
from hvkit.arch.x86.modes import GDT, gdt_entry, segment_from_descriptor, write_identity_page_tables
from hvkit.errors import ConfigError
from hvkit.kvm.structs import CpuidEntry
from hvkit.memory.guest import GuestMemory


def host_like():
    return [CpuidEntry(0, 0, 0, 0xD, 0, 0, 0),
            CpuidEntry(1, 0, 0, 0x806F8, 0x00000800, (1 << 23) | (1 << 13), 1),
            CpuidEntry(4, 0, 1, 0x121, 0, 0, 0),
            CpuidEntry(0xB, 0, 1, 1, 1, 0x100, 0),
            CpuidEntry(0xB, 1, 1, 4, 4, 0x201, 0),
            CpuidEntry(7, 0, 1, 0, 1 << 20, 0, 0)]


@pytest.mark.parametrize("vcpu", [0, 1, 3])
def test_each_vcpu_gets_its_apic_id(vcpu):
    table = build_cpuid(host_like(), vcpu, 4)
    leaf1 = find(table, 1)
    assert leaf1.ebx >> 24 == vcpu
    assert (leaf1.ebx >> 16) & 0xFF == 4
    assert leaf1.ecx >> 31 == 1                      # hypervisor bit
    assert leaf1.edx >> 28 & 1 == 1                  # HTT with >1 CPU
    assert find(table, 0xB, 0).edx == vcpu
    assert find(table, 0xB, 1).ebx == 4
    assert find(table, 4).eax >> 26 == 3


def test_input_table_is_not_modified():
    src = host_like()
    build_cpuid(src, 2, 4, clear=["popcnt"])
    assert find(src, 1).ebx >> 24 == 0
    assert has_feature(src, "popcnt")


def test_clear_features():
    table = build_cpuid(host_like(), 0, 1, clear=["popcnt", "cx16", "smap"])
    assert not has_feature(table, "popcnt")
    assert not has_feature(table, "cx16")
    assert not has_feature(table, "smap")
    assert has_feature(table, "fpu")


def test_unknown_feature_and_bad_vcpu():
    with pytest.raises(ConfigError, match="unknown CPUID feature 'warp'"):
        build_cpuid(host_like(), 0, 1, clear=["warp"])
    with pytest.raises(ConfigError):
        build_cpuid(host_like(), 2, 2)


def test_gdt_descriptors_decode_to_kvm_segments():
    code64 = segment_from_descriptor(0x10, GDT[2])
    assert (code64.l, code64.db, code64.g, code64.type, code64.dpl) == (1, 0, 1, 0xB, 0)
    assert code64.limit == 0xFFFFFFFF
    data = segment_from_descriptor(0x18, GDT[3])
    assert (data.db, data.type, data.s, data.present) == (1, 0x3, 1, 1)


def test_gdt_entry_packs_base_and_limit():
    d = gdt_entry(0x12345678, 0xABCDE, 0x89, 0x0)
    seg = segment_from_descriptor(0x28, d)
    assert seg.base == 0x12345678 and seg.limit == 0xABCDE and seg.type == 9


def test_identity_page_tables_map_4gib():
    with GuestMemory.create(1 << 20) as mem:
        cr3 = write_identity_page_tables(mem)
        assert cr3 == layout.PML4_ADDR
        pml4e = mem.read_u64(cr3)
        assert pml4e & ~0xFFF == layout.PDPT_ADDR and pml4e & 1
        for gib in range(4):
            pd = mem.read_u64(layout.PDPT_ADDR + 8 * gib) & ~0xFFF
            for j in (0, 511):
                pde = mem.read_u64(pd + 8 * j)
                assert pde & ~0xFFF == (gib << 30) + (j << 21)
                assert pde & 0x87 == 0x87            # present, writable, user, 2 MiB
        with pytest.raises(ConfigError):
            write_identity_page_tables(mem, gib=5)


def test_layout_keeps_boot_structures_apart():
    spans = [(layout.GDT_ADDR, 8 * layout.GDT_ENTRIES), (layout.BOOT_IDT_ADDR, 8),
             (layout.PML4_ADDR, 0x1000), (layout.PDPT_ADDR, 0x1000),
             (layout.PD_ADDR, 0x1000 * layout.PD_COUNT),
             (layout.GUEST_ARGS_ADDR, layout.GUEST_ARGS_MAX)]
    spans.sort()
    for (a, la), (b, _) in zip(spans, spans[1:]):
        assert a + la <= b
    assert spans[-1][0] + spans[-1][1] <= layout.BOOT_STACK_TOP - 16 * layout.BOOT_STACK_SIZE \
        or layout.PD_ADDR + 0x4000 <= layout.BOOT_STACK_TOP
    assert struct.calcsize("<Q") == 8


def test_gdt_follows_the_linux_64bit_boot_protocol():
    from hvkit.arch.x86.modes import SEL_CODE64, SEL_DATA
    assert (SEL_CODE64, SEL_DATA) == (0x10, 0x18)
    assert segment_from_descriptor(0x08, GDT[1]).db == 1     # 32-bit code for PVH
