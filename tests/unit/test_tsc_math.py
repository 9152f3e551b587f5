"""TSC scaling arithmetic against exact rationals, KVM's decision branches,
the CPUID timing leaves, the timer policy and the saved-state format."""
from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from hvkit.arch.x86.cpuid import find
from hvkit.errors import ConfigError
from hvkit.kvm.structs import CpuidEntry
from hvkit.time.clock import (KVM_APIC_BUS_KHZ, TscState, VcpuTsc, timing_leaves,
                              tsc_khz_from_cpuid)
from hvkit.time.ticks import LostTicks, TimerPolicy
from hvkit.time.tsc import (AMD, INTEL, U32, U64, TscError, TscMode, check_ratio,
                            effective_khz, format_for_vendor, guest_tsc, offset_for, plan,
                            ratio_for, scale_tsc, tolerance_bounds)

khz = st.integers(min_value=1, max_value=U32)
fmts = st.sampled_from([INTEL, AMD])
u64 = st.integers(min_value=0, max_value=U64)


def exact_ratio(guest: int, host: int, fmt) -> int:
    """The definition: floor(guest / host * 2**frac_bits), with rationals."""
    q = Fraction(guest, host) * fmt.one
    return q.numerator // q.denominator


# -- ratio ---------------------------------------------------------------------

@settings(max_examples=2000)
@given(khz, khz, fmts)
def test_ratio_matches_exact_floor_or_is_refused(guest: int, host: int, fmt) -> None:
    expected = exact_ratio(guest, host, fmt)
    if expected == 0 or expected >= fmt.max_ratio:
        with pytest.raises(TscError):
            ratio_for(guest, host, fmt)
    else:
        assert ratio_for(guest, host, fmt) == expected


@settings(max_examples=1000)
@given(khz, khz, fmts)
def test_effective_rate_is_within_one_ulp_below_request(guest: int, host: int, fmt) -> None:
    try:
        ratio = ratio_for(guest, host, fmt)
    except TscError:
        return
    eff = effective_khz(host, ratio, fmt)
    # Truncation makes the rate never exceed the request, and miss it by less
    # than one unit of the last place: host / 2**frac_bits kHz.
    assert eff <= guest
    assert guest - eff < Fraction(host, fmt.one)


def test_known_ratios() -> None:
    assert ratio_for(2_000_000, 1_000_000, INTEL) == 2 << 48
    assert ratio_for(1_000_000, 1_000_000, AMD) == 1 << 32
    assert ratio_for(1_500_000, 3_000_000, AMD) == 1 << 31
    # 3 GHz on this CI host's 2596.096 MHz: floor(3e6 * 2**32 / 2596096).
    assert ratio_for(3_000_000, 2_596_096, AMD) == 0x127D42D22
    assert ratio_for(3_000_000, 2_596_096, INTEL) == 3_000_000 * 2**48 // 2_596_096


def test_ratio_limits_are_refused_with_reasons() -> None:
    # With 32-bit kHz inputs the smallest ratio is 1 (1 kHz on a 4.29 THz host),
    # so only a raw ratio of 0 (check_ratio) can be zero.
    assert ratio_for(1, U32, AMD) == 1
    with pytest.raises(TscError, match="maximum"):
        ratio_for(U32, 1, AMD)           # 2**32 x: beyond 8 integer bits
    with pytest.raises(TscError, match="maximum"):
        ratio_for(256, 1, AMD)           # exactly 256.0 needs a 9th integer bit
    assert ratio_for(255, 1, AMD) == 255 << 32
    with pytest.raises(TscError, match="outside 1"):
        ratio_for(0, 1_000_000, INTEL)
    with pytest.raises(TscError, match="outside 1"):
        ratio_for(1_000_000, U32 + 1, INTEL)
    with pytest.raises(TscError, match="integer"):
        ratio_for(1.5, 1_000_000, INTEL)  # type: ignore[arg-type]


@given(st.integers(min_value=1, max_value=(1 << 40) - 2))
def test_amd_ratios_in_range_pass_check(ratio: int) -> None:
    assert check_ratio(ratio, AMD) == ratio


@given(st.integers(min_value=40, max_value=63), st.integers(min_value=0, max_value=(1 << 40) - 1))
def test_amd_reserved_bits_refused(bit: int, low: int) -> None:
    with pytest.raises(TscError, match="reserved bits"):
        check_ratio(low | 1 << bit, AMD)


def test_check_ratio_zero_and_range() -> None:
    with pytest.raises(TscError, match="stop the guest TSC"):
        check_ratio(0, INTEL)
    with pytest.raises(TscError, match="maximum"):
        check_ratio(U64, INTEL)
    with pytest.raises(TscError, match="64-bit"):
        check_ratio(U64 + 1, INTEL)
    assert check_ratio(U64 - 1, INTEL) == U64 - 1


# -- guest TSC -------------------------------------------------------------------

@settings(max_examples=2000)
@given(u64, st.integers(min_value=1, max_value=U64 - 1), fmts, u64)
def test_guest_tsc_is_scaled_product_plus_offset_mod_2_64(host_tsc: int, ratio: int, fmt,
                                                          offset: int) -> None:
    assume(not ratio & fmt.reserved_mask)
    scaled = (Fraction(host_tsc) * Fraction(ratio, fmt.one))
    expected = (scaled.numerator // scaled.denominator) % 2**64
    assert scale_tsc(host_tsc, ratio, fmt) == expected
    assert guest_tsc(host_tsc, ratio, offset, fmt) == (expected + offset) % 2**64


@settings(max_examples=1000)
@given(u64, u64, st.integers(min_value=1, max_value=(1 << 40) - 2), fmts)
def test_offset_for_lands_on_target(target: int, host_tsc: int, ratio: int, fmt) -> None:
    off = offset_for(target, host_tsc, ratio, fmt)
    assert 0 <= off <= U64
    assert guest_tsc(host_tsc, ratio, off, fmt) == target


def test_unit_ratio_is_identity() -> None:
    for fmt in (INTEL, AMD):
        assert scale_tsc(U64, fmt.one, fmt) == U64
        assert guest_tsc(10, fmt.one, U64, fmt) == 9   # wraps like the hardware adder


# -- KVM's decision ----------------------------------------------------------------

@given(khz)
def test_tolerance_bounds_match_kvm_adjust_tsc_khz(host: int) -> None:
    lo, hi = tolerance_bounds(host)
    assert lo == host * 999_750 // 1_000_000
    assert hi == host * 1_000_250 // 1_000_000
    assert lo <= host <= hi


HOST = 2_596_096


def test_plan_within_tolerance_is_native_everywhere() -> None:
    lo, hi = tolerance_bounds(HOST)
    for req in (lo, HOST, hi):
        for hw in (False, True):
            p = plan(req, HOST, hardware_scaling=hw)
            assert p.mode is TscMode.NATIVE
            assert p.effective_khz == HOST
            assert "within 250 ppm" in p.describe()


def test_plan_above_without_hardware_is_catchup() -> None:
    _, hi = tolerance_bounds(HOST)
    p = plan(hi + 1, HOST, hardware_scaling=False)
    assert p.mode is TscMode.CATCHUP
    assert p.effective_khz == HOST         # between exits: the host rate
    text = p.describe()
    assert "catch-up" in text and str(HOST) in text and "between exits" in text


def test_plan_below_without_hardware_names_host_rate() -> None:
    lo, _ = tolerance_bounds(HOST)
    with pytest.raises(TscError) as err:
        plan(lo - 1, HOST, hardware_scaling=False)
    msg = str(err.value)
    assert f"host's {HOST} kHz" in msg and "EINVAL" in msg and str(lo) in msg


@given(khz, st.integers(min_value=1_000, max_value=U32), fmts)
def test_plan_with_hardware_scales_outside_tolerance(req: int, host: int, fmt) -> None:
    lo, hi = tolerance_bounds(host)
    assume(not lo <= req <= hi)
    expected = exact_ratio(req, host, fmt)
    if expected == 0 or expected >= fmt.max_ratio:
        with pytest.raises(TscError):
            plan(req, host, hardware_scaling=True, fmt=fmt)
        return
    p = plan(req, host, hardware_scaling=True, fmt=fmt)
    assert p.mode is TscMode.SCALED and p.ratio == expected
    assert abs(p.error_ppm) < 1e6 * host / fmt.one / req + 1e-9


def test_format_for_vendor() -> None:
    assert format_for_vendor("GenuineIntel") is INTEL
    assert format_for_vendor("AuthenticAMD") is AMD
    assert format_for_vendor("HygonGenuine") is AMD
    with pytest.raises(TscError, match="CentaurHauls"):
        format_for_vendor("CentaurHauls")


# -- CPUID ---------------------------------------------------------------------------

BASE = [CpuidEntry(0, eax=0xD), CpuidEntry(0x40000000, eax=0x40000001),
        CpuidEntry(0x15, eax=9, ebx=9, ecx=9)]


@given(st.integers(min_value=1, max_value=U32))
def test_timing_leaves_round_trip(k: int) -> None:
    out = timing_leaves(BASE, k)
    assert tsc_khz_from_cpuid(out) == k
    # Leaf 0x15 alone gives the same answer (guests that ignore 0x40000010).
    only15 = [e for e in out if e.function != 0x40000010]
    assert tsc_khz_from_cpuid(only15) == k
    assert len([e for e in out if e.function == 0x15]) == 1


def test_timing_leaves_raise_max_leaves_and_keep_higher_ones() -> None:
    out = timing_leaves(BASE, 2_000_000)
    assert find(out, 0).eax == 0x16
    assert find(out, 0x40000000).eax == 0x40000010
    t = find(out, 0x40000010)
    assert (t.eax, t.ebx) == (2_000_000, KVM_APIC_BUS_KHZ)
    assert find(out, 0x16).eax == 2000
    high = [CpuidEntry(0, eax=0x1F), CpuidEntry(0x40000000, eax=0x40000100)]
    out = timing_leaves(high, 1000)
    assert find(out, 0).eax == 0x1F and find(out, 0x40000000).eax == 0x40000100
    assert BASE[0].eax == 0xD            # inputs are not modified
    with pytest.raises(TscError):
        timing_leaves(BASE, 0)


# -- timer policy ------------------------------------------------------------------

def test_policy_factors_are_explicit() -> None:
    pol = TimerPolicy(hz=100, catchup_factor=4)
    assert pol.decide().hz == 100 and pol.decide().factors == {}
    d = pol.decide(owed=5)
    assert d.hz == 400 and d.factors == {"catchup": 4} and d.scale == 4
    catchup = plan(3_000_000, HOST, hardware_scaling=False)
    d = pol.decide(catchup)
    assert d.factors["tsc"] == pytest.approx(HOST / 3_000_000)
    assert d.hz == pytest.approx(100 * HOST / 3_000_000)
    d = pol.decide(catchup, owed=1)
    assert d.scale == pytest.approx(4 * HOST / 3_000_000)
    assert TimerPolicy(follow_tsc=False).decide(catchup).factors == {}


def test_policy_discard_never_owes_or_accelerates() -> None:
    pol = TimerPolicy(hz=250, lost_ticks="discard")
    assert pol.lost_ticks is LostTicks.DISCARD
    assert pol.max_backlog() == 0
    assert pol.decide(owed=10).hz == 250
    assert TimerPolicy(hz=250, max_backlog_s=2).max_backlog() == 500


@pytest.mark.parametrize("kwargs, match", [
    ({"hz": 0}, "timer rate"), ({"hz": 20_000}, "timer rate"),
    ({"catchup_factor": 0.5}, "catchup_factor"), ({"max_backlog_s": -1}, "negative"),
    ({"lost_ticks": "slew"}, "lost_ticks"),
])
def test_policy_refuses_bad_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TimerPolicy(**kwargs)


# -- saved state --------------------------------------------------------------------

def test_tsc_state_round_trips_and_checks_version() -> None:
    s = TscState([VcpuTsc(0, 123, 0, HOST), VcpuTsc(1, 456, None, HOST)], 789, 10, 20, HOST)
    assert TscState.from_dict(s.to_dict()) == s
    bad = s.to_dict() | {"version": 99}
    with pytest.raises(ConfigError, match="version 99"):
        TscState.from_dict(bad)
    broken = s.to_dict()
    del broken["vcpus"][0]["tsc"]
    with pytest.raises(ConfigError, match="malformed"):
        TscState.from_dict(broken)
