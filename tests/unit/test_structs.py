import struct

from hvkit import _native
from hvkit.kvm.caps import Cap, ExitReason
from hvkit.kvm.structs import (CpuidEntry, Fpu, Regs, Segment, Sregs, VcpuEvents, Xcrs,
                               check_sizes, pack_cpuid2, pack_msrs, unpack_cpuid2, unpack_msrs)

import pytest


def test_layouts_match_the_c_headers():
    check_sizes(_native.SIZES)


def test_regs_roundtrip():
    r = Regs(rax=1, r15=2, rip=0x1000, rflags=0x202)
    assert Regs.unpack(r.pack()) == r


def test_sregs_roundtrip():
    s = Sregs()
    s.cs = Segment(base=0x10, limit=0xFFFFF, selector=8, type=11, l=1, g=1)
    s.cr0, s.cr3, s.efer = 0x80000011, 0x9000, 0x500
    s.gdt.base, s.gdt.limit = 0x500, 31
    assert len(s.pack()) == _native.SIZES["sregs"]
    assert Sregs.unpack(s.pack()) == s


def test_fpu_events_xcrs_roundtrip():
    f = Fpu(fcw=0x37F, mxcsr=0x1F80, xmm=bytes(range(256)))
    assert Fpu.unpack(f.pack()) == f
    e = VcpuEvents(exception_injected=1, exception_nr=14, nmi_pending=1, exception_payload=5)
    assert VcpuEvents.unpack(e.pack()) == e
    x = Xcrs({0: 7})
    assert Xcrs.unpack(x.pack()).xcrs == {0: 7}


def test_cpuid_and_msr_buffers():
    entries = [CpuidEntry(1, 0, 0, 1, 2, 3, 4), CpuidEntry(7, 1, 1, 5, 6, 7, 8)]
    assert unpack_cpuid2(pack_cpuid2(entries)) == entries
    assert unpack_msrs(pack_msrs([(0x10, 5), (0x1B, 6)]), 2) == {0x10: 5, 0x1B: 6}


def test_capability_names():
    assert Cap.parse("tsc_control") == Cap.TSC_CONTROL == 60
    assert Cap.parse("KVM_CAP_IRQFD") == Cap.IRQFD
    with pytest.raises(ValueError, match="unknown KVM capability"):
        Cap.parse("WARP_DRIVE")
    assert ExitReason(2) == ExitReason.IO


def test_native_ioctl_numbers_present():
    for name in ("RUN", "CREATE_VM", "SET_USER_MEMORY_REGION", "IOEVENTFD", "IRQFD",
                 "SET_TSC_KHZ", "GET_DIRTY_LOG", "CLEAR_DIRTY_LOG", "SIGNAL_MSI"):
        assert _native.IOCTLS[name] > 0


def test_console_sink_orders_and_limits():
    sink = _native.ConsoleSink(limit=8)
    sink.write(b"abc")
    sink.write(b"defghij")
    assert sink.getvalue() == b"abcdefgh"
    assert sink.dropped == 2


# -- member offsets against <linux/kvm.h> ---------------------------------------

from hvkit.kvm import structs  # noqa: E402


def test_every_member_offset_matches_the_c_headers():
    structs.check_offsets(_native.FIELD_OFFSETS)
    assert _native.FIELD_OFFSETS[("vcpu_events", "exception_payload")] == (56, 8)
    assert _native.FIELD_OFFSETS[("sregs", "interrupt_bitmap")] == (280, 32)


def test_a_member_moved_within_the_same_size_is_caught(monkeypatch):
    # The pad byte of kvm_vcpu_events.nmi moved one place: same total size,
    # so check_sizes passes, but sipi_vector and flags are read one byte off.
    monkeypatch.setattr(VcpuEvents, "FMT", struct.Struct("<4BI4B3BIxI4BB26xBQ"))
    check_sizes(_native.SIZES)
    with pytest.raises(RuntimeError, match=r"kvm_vcpu_events.sipi_vector: ours at 15"):
        structs.check_offsets(_native.FIELD_OFFSETS)


def test_a_member_of_the_wrong_width_is_caught(monkeypatch):
    monkeypatch.setattr(Fpu, "FMT", struct.Struct("<128sHHBxHQQ256sQ"))
    with pytest.raises(RuntimeError, match=r"kvm_fpu.mxcsr: ours at 408 \(8 bytes\)"):
        structs.check_offsets(_native.FIELD_OFFSETS)


def test_field_layout_reads_formats():
    assert structs.field_layout("<BxH4s2I") == [(0, 1), (2, 2), (4, 4), (8, 4), (12, 4)]
    with pytest.raises(ValueError, match="little-endian"):
        structs.field_layout("IIQ")


def seq(fmt, names):
    return structs._seq(fmt, names)


# The layouts hvkit.kvm.vm, hvkit.kvm.vcpu and hvkit.time pack inline, as
# they are written there.
INLINE = {
    "userspace_memory_region": seq("<IIQQQ", "slot flags guest_phys_addr memory_size "
                                            "userspace_addr"),
    "dirty_log": seq("<IIQ", "slot - dirty_bitmap"),
    "clear_dirty_log": seq("<IIQQ", "slot num_pages first_page dirty_bitmap"),
    "irq_level": seq("<II", "irq level"),
    "msi": seq("<IIIII12x", "address_lo address_hi data flags devid"),
    "ioeventfd": seq("<QQIiI36x", "datamatch addr len fd flags"),
    "irqfd": seq("<IIII16x", "fd gsi flags resamplefd"),
    "enable_cap": seq("<II", "cap flags") + [("args", 8, 32)],
    "pit_config": seq("<I60x", "flags"),
    "irq_routing": seq("<I4x", "nr") + [("entries", 8, 0)],
    "irq_routing_entry": seq("<III4x", "gsi type flags") + [("u", 16, 32)],
    "clock_data": seq("<QIIQQ16x", "clock flags - realtime host_tsc"),
    "msr_filter": seq("<I4x", "flags") + [("ranges", 8, 16 * 24)],
    "msr_filter_range": seq("<IIIxxxxQ", "flags nmsrs base bitmap"),
    "guest_debug": seq("<II", "control -") + [("arch", 8, 64)],
    "translation": seq("<QQBBBB4x", "linear_address physical_address valid writeable "
                                    "usermode -"),
    "mp_state": seq("<I", "mp_state"),
}


def test_inline_layouts_elsewhere_match_too():
    structs.check_offsets(_native.FIELD_OFFSETS, extra=INLINE)
