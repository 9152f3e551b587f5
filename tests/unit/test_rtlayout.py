"""The guest runtime's published layout (rt_layout): the VMM reads it from
the image and builds the runtime's CPL0 state from it, so it must agree
with the C runtime, and a layout that does not fit the image is refused."""
import struct

import pytest
from hypothesis import given, settings, strategies as st

from hvkit import guests
from hvkit.arch.x86.registers import RFLAGS_IOPL3
from hvkit.boot import rtlayout
from hvkit.boot.elf import ElfImage, Segment, parse_elf
from hvkit.errors import GuestLoadError
from hvkit.kvm.structs import Sregs

BASE = 0x100000
GDT = [0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x00AFFB000000FFFF, 0x00CFF3000000FFFF]


def valid_fields(ncpus=2):
    """A layout for a synthetic image: structures at fixed offsets from BASE."""
    return dict(magic=rtlayout.MAGIC, version=rtlayout.VERSION, max_cpus=ncpus,
                gdt=BASE + 0x1000, gdt_size=8 * (5 + 2 * ncpus), tss_index=5,
                user_code=0x1B, user_data=0x23, idt=BASE + 0x2000, idt_size=4096,
                gates=BASE + 0x3000, ngates=2, tss=BASE + 0x4000, tss_size=0x2069,
                iomap_offset=104, iomap_bytes=8192, percpu=BASE + 0x9000, percpu_size=128,
                kstacks=BASE + 0xA000, ustacks=BASE + 0x1A000, stack_size=0x4000,
                pml4=BASE + 0x30000, user_entry=BASE + 0x10)


def image(fields, gates=((BASE + 0x20, 14, 0x8E), (BASE + 0x30, 3, 0xEE)), size=0x40000):
    data = bytearray(size)
    struct.pack_into(f"<{len(GDT)}Q", data, 0x1000, *GDT)
    for i, (handler, vector, kind) in enumerate(gates):
        rtlayout.GATE.pack_into(data, 0x3000 + 16 * i, handler, vector, kind)
    struct.pack_into(rtlayout.LAYOUT.format, data, 0x500,
                     *[fields[k] for k in rtlayout.FIELDS])
    return ElfImage("t.elf", BASE, [Segment(BASE, bytes(data), size)],
                    {rtlayout.SYMBOL: BASE + 0x500})


def test_bundled_runtime_publishes_its_layout():
    img = parse_elf(guests.path("hello"))
    rt = img.runtime
    assert rt is not None
    sym = img.symbols
    assert rt.user_entry == sym["rt_user_start"] and rt.pml4 == sym["rt_pml4"]
    assert rt.gdt == sym["rt_gdt"] and rt.kstacks == sym["rt_kstacks"]
    assert (rt.idt, rt.tss, rt.percpu) == (sym["idt"], sym["tss"], sym["percpu"])
    vectors = {v: (h, t) for v, h, t in rt.gates}
    assert vectors[3] == (sym["rt_bp_entry"], 0xEE)          # the kernel-call gate, open to CPL3
    assert vectors[14] == (sym["rt_exc14"], 0x8E)
    assert vectors[255][0] == sym["rt_irq_entry"]
    assert sorted(vectors) == list(range(48)) + [255]


def test_idt_and_per_vcpu_bytes_are_what_the_runtime_writes():
    rt = rtlayout.find_layout(image(valid_fields()))
    gate = rt.idt_image[16 * 14:16 * 15]
    off0, sel, ist, kind, off1, off2, _ = rtlayout.IDT_GATE.unpack(gate)
    assert (sel, ist, kind) == (0x08, 0, 0x8E)
    assert off0 | off1 << 16 | off2 << 32 == BASE + 0x20
    assert rt.idt_image[16 * 3 + 5] == 0xEE and rt.idt_image[16 * 4:16 * 5] == bytes(16)
    writes = dict(rt.cpu_writes(1, apic_id=7))
    tss1 = BASE + 0x4000 + 0x2069
    lo, hi = struct.unpack("<QQ", writes[rt.gdt + (5 + 2) * 8])
    assert (lo >> 40) & 0xFF == 0x8B and hi == 0                 # present, busy 64-bit TSS
    assert (lo >> 16) & 0xFFFFFF | ((lo >> 56) & 0xFF) << 24 == tss1
    assert (lo & 0xFFFF) == 0x2068
    assert writes[tss1 + 4] == struct.pack("<Q", BASE + 0xA000 + 2 * 0x4000)
    assert writes[tss1 + 102] == struct.pack("<H", 104)
    assert writes[tss1 + 104 + 8192] == b"\xff"
    assert writes[BASE + 0x9000 + 128] == struct.pack("<QII", BASE + 0x9000 + 128, 1, 7)


def test_entry_state_is_the_runtime_at_cpl3():
    rt = rtlayout.find_layout(image(valid_fields()))
    s = rt.entry_sregs(Sregs(apic_base=0xFEE00900), 1)
    assert s.cs.dpl == 3 and s.cs.l == 1 and s.cs.selector == 0x1B
    assert s.ss.dpl == 3 and s.ss.selector == 0x23
    assert s.tr.selector == 0x38 and s.tr.type == 0xB and s.tr.base == BASE + 0x4000 + 0x2069
    assert s.fs.base == BASE + 0x9000 + 128 and s.cr3 == BASE + 0x30000
    assert s.apic_base == 0xFEE00900                             # kept from the vCPU
    r = rt.entry_regs(1, 2, 0x8000)
    assert (r.rip, r.rdi, r.rsi, r.rdx) == (BASE + 0x10, 1, 2, 0x8000)
    assert r.rsp == BASE + 0x1A000 + 2 * 0x4000 and r.rflags & RFLAGS_IOPL3 == RFLAGS_IOPL3
    with pytest.raises(GuestLoadError, match="holds 2 vCPUs"):
        rt.entry_regs(2, 3, 0x8000)


def test_other_versions_start_the_old_way():
    assert rtlayout.find_layout(image(valid_fields() | {"version": 2})) is None
    assert rtlayout.find_layout(image(valid_fields() | {"magic": 0})) is None
    img = image(valid_fields())
    img.symbols.clear()
    assert rtlayout.find_layout(img) is None


@pytest.mark.parametrize("change,msg", [
    ({"tss_size": 50}, "TSS size"),
    ({"percpu": BASE + 0x3FFF0}, "per-vCPU blocks"),
    ({"user_code": 0x23}, "user_code"),
    ({"user_data": 0x18}, "user_data"),
    ({"gdt_size": 8 * 6}, "no room"),
    ({"iomap_bytes": 0x2069 - 104}, "I/O map"),
    ({"ngates": 300}, "gates"),
    ({"max_cpus": 0}, "max_cpus"),
    ({"pml4": BASE + 0x30008}, "aligned"),
])
def test_layouts_that_do_not_fit_are_refused(change, msg):
    with pytest.raises(GuestLoadError, match=msg):
        rtlayout.find_layout(image(valid_fields() | change))


def test_gates_are_checked():
    with pytest.raises(GuestLoadError, match="type 0x0"):
        rtlayout.find_layout(image(valid_fields(), gates=((BASE, 1, 0), (BASE, 2, 0x8E))))
    with pytest.raises(GuestLoadError, match="past the IDT"):
        rtlayout.find_layout(image(valid_fields() | {"idt_size": 64},
                                   gates=((BASE, 4, 0x8E), (BASE, 2, 0x8E))))
    with pytest.raises(GuestLoadError, match="handler of vector 2"):
        rtlayout.find_layout(image(valid_fields(), gates=((BASE, 1, 0x8E), (0x1000, 2, 0x8E))))


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(rtlayout.FIELDS[2:]), st.integers(0, 2**64 - 1) | st.integers(0, 0x50000))
def test_any_layout_is_refused_or_fits_the_image(field, value):
    img = image(valid_fields() | {field: value})
    try:
        rt = rtlayout.find_layout(img)
    except GuestLoadError:
        return
    inside = lambda a, n: img.start <= a and a + n <= img.end
    assert inside(rt.gdt, rt.gdt_size) and inside(rt.idt, rt.idt_size)
    assert inside(rt.tss, rt.tss_size * rt.max_cpus)
    assert inside(rt.percpu, rt.percpu_size * rt.max_cpus)
    assert inside(rt.kstacks, rt.stack_size * (rt.max_cpus + 1))
    assert inside(rt.ustacks, rt.stack_size * (rt.max_cpus + 1))
    for cpu in range(rt.max_cpus):
        for addr, data in rt.cpu_writes(cpu, cpu):
            assert inside(addr, len(data))
            if rt.gdt <= addr < rt.gdt + rt.gdt_size:
                assert addr + len(data) <= rt.gdt + rt.gdt_size
    assert len(rt.idt_image) == rt.idt_size
