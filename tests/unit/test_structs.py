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
