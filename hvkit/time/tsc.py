"""TSC scaling arithmetic, bit for bit as the hardware and KVM do it.

A scaled guest reads ``((host_tsc * ratio) >> frac_bits) + offset`` (mod
2**64). Intel VMX keeps the ratio as 16.48 fixed point in a 64-bit field;
AMD SVM as 8.32 in MSR C000_0104 with bits 63:40 reserved. KVM derives the
ratio for a requested frequency with ``mul_u64_u32_div(1 << frac_bits,
user_khz, host_khz)``, i.e. it rounds toward zero, and refuses a ratio of 0
or one at or above the format's maximum. It also skips scaling entirely
when the request lies within ``tsc_tolerance_ppm`` (250 by default) of the
host rate. Everything here is plain integer arithmetic so that it can be
checked against exact rationals and used to predict what a guest will see.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from fractions import Fraction

from hvkit.errors import ConfigError

U64 = (1 << 64) - 1
U32 = (1 << 32) - 1
#: KVM's default ``tsc_tolerance_ppm`` module parameter.
DEFAULT_TOLERANCE_PPM = 250


class TscError(ConfigError):
    """A TSC frequency or ratio that cannot be programmed."""


@dataclass(frozen=True)
class RatioFormat:
    """A fixed-point format for the TSC multiplier."""

    name: str
    int_bits: int
    frac_bits: int
    #: KVM refuses ratios >= this (kvm_caps.max_tsc_scaling_ratio).
    max_ratio: int
    #: Bits that must be zero in the register (AMD's 63:40).
    reserved_mask: int

    @property
    def one(self) -> int:
        """The ratio that means 1.0 (KVM's default_tsc_scaling_ratio)."""
        return 1 << self.frac_bits

    def __str__(self) -> str:
        return f"{self.name} {self.int_bits}.{self.frac_bits}"


#: Intel VMX TSC multiplier: 16.48, the whole 64-bit field is the ratio.
INTEL = RatioFormat("Intel", 16, 48, max_ratio=U64, reserved_mask=0)
#: AMD SVM MSR_AMD64_TSC_RATIO: 8.32, bits 63:40 reserved.
AMD = RatioFormat("AMD", 8, 32, max_ratio=(1 << 40) - 1,
                  reserved_mask=U64 & ~((1 << 40) - 1))


def format_for_vendor(vendor: str) -> RatioFormat:
    """The ratio format of a CPU vendor string ("GenuineIntel", "AuthenticAMD", ...)."""
    v = vendor.lower()
    if "intel" in v:
        return INTEL
    if "amd" in v or "hygon" in v:
        return AMD
    raise TscError(f"no TSC ratio format is known for CPU vendor {vendor!r}")


def _check_khz(value: int, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TscError(f"{what} must be an integer number of kHz, got {value!r}")
    if not 0 < value <= U32:
        raise TscError(f"{what} {value} kHz is outside 1..{U32} kHz "
                       "(KVM takes a 32-bit kHz value)")


def check_ratio(ratio: int, fmt: RatioFormat) -> int:
    """Refuse a raw ratio the format or KVM cannot hold; return it."""
    if not isinstance(ratio, int) or ratio < 0 or ratio > U64:
        raise TscError(f"TSC ratio {ratio!r} is not a 64-bit unsigned value")
    if ratio == 0:
        raise TscError(f"TSC ratio 0 would stop the guest TSC ({fmt} format)")
    if ratio & fmt.reserved_mask:
        raise TscError(f"TSC ratio {ratio:#x} sets reserved bits "
                       f"{ratio & fmt.reserved_mask:#x} of the {fmt} format")
    if ratio >= fmt.max_ratio:
        raise TscError(f"TSC ratio {ratio:#x} is at or above the {fmt} maximum "
                       f"{fmt.max_ratio:#x} that KVM accepts")
    return ratio


def ratio_for(guest_khz: int, host_khz: int, fmt: RatioFormat) -> int:
    """The multiplier KVM programs for ``guest_khz`` on a ``host_khz`` host:
    floor(2**frac_bits * guest / host), refused if 0 or too large."""
    _check_khz(guest_khz, "guest TSC frequency")
    _check_khz(host_khz, "host TSC frequency")
    ratio = (guest_khz << fmt.frac_bits) // host_khz
    if ratio == 0:
        raise TscError(f"guest TSC {guest_khz} kHz is too slow for the {fmt} format on a "
                       f"{host_khz} kHz host: the ratio rounds to 0")
    if ratio >= fmt.max_ratio:
        raise TscError(f"guest TSC {guest_khz} kHz is too fast for the {fmt} format on a "
                       f"{host_khz} kHz host: ratio {ratio:#x} >= maximum {fmt.max_ratio:#x}")
    return check_ratio(ratio, fmt)


def ratio_value(ratio: int, fmt: RatioFormat) -> Fraction:
    """The exact rational a raw ratio stands for."""
    return Fraction(ratio, fmt.one)


def scale_tsc(host_tsc: int, ratio: int, fmt: RatioFormat) -> int:
    """kvm_scale_tsc: (host_tsc * ratio) >> frac_bits, truncated to 64 bits."""
    if not 0 <= host_tsc <= U64:
        raise TscError(f"host TSC {host_tsc!r} is not a 64-bit unsigned value")
    if ratio == fmt.one:
        return host_tsc
    return ((host_tsc * ratio) >> fmt.frac_bits) & U64


def guest_tsc(host_tsc: int, ratio: int, offset: int, fmt: RatioFormat) -> int:
    """What the guest's RDTSC returns: scaled host TSC plus offset, mod 2**64."""
    return (scale_tsc(host_tsc, ratio, fmt) + offset) & U64


def offset_for(target_guest_tsc: int, host_tsc: int, ratio: int, fmt: RatioFormat) -> int:
    """The offset that makes the guest read ``target_guest_tsc`` at
    ``host_tsc`` (kvm_compute_l1_tsc_offset), as an unsigned 64-bit value."""
    return (target_guest_tsc - scale_tsc(host_tsc, ratio, fmt)) & U64


def effective_khz(host_khz: int, ratio: int, fmt: RatioFormat) -> Fraction:
    """The guest TSC rate a ratio really produces, exactly."""
    return host_khz * ratio_value(ratio, fmt)


def tolerance_bounds(host_khz: int, ppm: int = DEFAULT_TOLERANCE_PPM) -> tuple[int, int]:
    """KVM's adjust_tsc_khz(host, -ppm) and (host, +ppm): requests inside
    [lo, hi] run at the host rate with no scaling and no error."""
    _check_khz(host_khz, "host TSC frequency")
    lo = host_khz * (1_000_000 - ppm) // 1_000_000
    hi = host_khz * (1_000_000 + ppm) // 1_000_000
    return lo, hi


class TscMode(enum.Enum):
    """How KVM will give the guest its requested TSC frequency."""

    NATIVE = "native"        # within tolerance: the host rate, no scaling
    SCALED = "scaled"        # hardware multiplier
    CATCHUP = "catchup"      # faster than the host, no hardware: KVM steps the TSC at entries


@dataclass(frozen=True)
class TscPlan:
    """The outcome of asking for ``requested_khz`` on a host, decided the way
    kvm_set_tsc_khz decides it."""

    requested_khz: int
    host_khz: int
    mode: TscMode
    ratio: int
    fmt: RatioFormat
    tolerance_ppm: int

    @property
    def effective_khz(self) -> Fraction:
        """The rate the guest TSC runs at between exits."""
        if self.mode is TscMode.SCALED:
            return effective_khz(self.host_khz, self.ratio, self.fmt)
        return Fraction(self.host_khz)

    @property
    def error_ppm(self) -> float:
        """How far the between-exits rate lies from the request."""
        return float((self.effective_khz - self.requested_khz) / self.requested_khz * 10**6)

    def describe(self) -> str:
        if self.mode is TscMode.NATIVE:
            return (f"{self.requested_khz} kHz is within {self.tolerance_ppm} ppm of the host's "
                    f"{self.host_khz} kHz: the guest runs at the host rate, no scaling")
        if self.mode is TscMode.SCALED:
            return (f"{self.requested_khz} kHz by hardware scaling: {self.fmt} ratio "
                    f"{self.ratio:#x} = {float(ratio_value(self.ratio, self.fmt)):.9f} of "
                    f"{self.host_khz} kHz, error {self.error_ppm:+.4f} ppm")
        return catchup_meaning(self.requested_khz, self.host_khz)


def catchup_meaning(requested_khz: int, host_khz: int) -> str:
    """What KVM's fallback for a too-fast TSC means to a guest."""
    return (f"guest TSC {requested_khz} kHz is above the host's {host_khz} kHz and this host "
            f"has no TSC scaling: KVM accepts it in catch-up mode. The guest TSC still counts "
            f"at the host's {host_khz} kHz between exits; KVM only steps it forward when the "
            f"vCPU re-enters after an exit. Code that takes no exits measures the host rate "
            f"({float(Fraction(host_khz, requested_khz)) * 100:.2f}% of the request), and "
            f"the TSC jumps at exits")


def plan(requested_khz: int, host_khz: int, *, hardware_scaling: bool,
         fmt: RatioFormat = INTEL, tolerance_ppm: int = DEFAULT_TOLERANCE_PPM) -> TscPlan:
    """Decide how a request will be served, raising the error KVM would
    (with the host frequency in it) before any ioctl is made."""
    _check_khz(requested_khz, "guest TSC frequency")
    _check_khz(host_khz, "host TSC frequency")
    lo, hi = tolerance_bounds(host_khz, tolerance_ppm)
    if lo <= requested_khz <= hi:
        return TscPlan(requested_khz, host_khz, TscMode.NATIVE, fmt.one, fmt, tolerance_ppm)
    if hardware_scaling:
        ratio = ratio_for(requested_khz, host_khz, fmt)
        return TscPlan(requested_khz, host_khz, TscMode.SCALED, ratio, fmt, tolerance_ppm)
    if requested_khz > host_khz:
        return TscPlan(requested_khz, host_khz, TscMode.CATCHUP, fmt.one, fmt, tolerance_ppm)
    raise TscError(f"guest TSC {requested_khz} kHz is below the host's {host_khz} kHz "
                   f"(by more than {tolerance_ppm} ppm, i.e. under {lo} kHz) and this host has "
                   f"no TSC scaling: KVM refuses it (KVM_SET_TSC_KHZ fails with EINVAL). "
                   f"Ask for {lo}..{hi} kHz, or any rate above {hi} kHz in catch-up mode")
