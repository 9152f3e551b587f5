"""Programming a VM's guest TSC: frequency, CPUID leaves, synchronized
values, and the TSC state a snapshot needs.

``GuestClock(vm, khz=...).apply()`` runs after the vCPUs exist and before
the first KVM_RUN (KVM refuses CPUID changes after it). It decides the
outcome with :func:`hvkit.time.tsc.plan` first, so a request the host
cannot honour fails with the host's frequency in the message instead of a
bare EINVAL from KVM_SET_TSC_KHZ.
"""
from __future__ import annotations

import struct
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

from hvkit import _native
from hvkit.arch.x86.cpuid import find
from hvkit.arch.x86.registers import MSR_IA32_TSC, MSR_IA32_TSC_ADJUST
from hvkit.errors import ConfigError, KvmError
from hvkit.kvm.caps import Cap
from hvkit.kvm.structs import CpuidEntry
from hvkit.kvm.vcpu import Vcpu
from hvkit.kvm.vm import Vm
from hvkit.time.tsc import (AMD, DEFAULT_TOLERANCE_PPM, INTEL, RatioFormat, TscError, TscMode,
                            TscPlan, catchup_meaning, format_for_vendor, plan)

LEAF_TSC_CRYSTAL = 0x15
LEAF_FREQUENCY = 0x16
LEAF_HYPERVISOR = 0x40000000
LEAF_TIMING = 0x40000010          # VMware's timing leaf: EAX TSC kHz, EBX LAPIC bus kHz
#: KVM's local APIC timer counts at 1 GHz (APIC_BUS_CYCLE_NS = 1).
KVM_APIC_BUS_KHZ = 1_000_000
#: The bus (reference) clock reported in leaf 0x16 ECX, in MHz.
BUS_MHZ = 100

KVM_CLOCK_TSC_STABLE = 2
KVM_CLOCK_REALTIME = 4
KVM_CLOCK_HOST_TSC = 8
_CLOCK_DATA = struct.Struct("<QIIQQ16x")


class TscCatchupWarning(UserWarning):
    """The guest TSC was set above the host rate on a host without TSC
    scaling: KVM serves it in catch-up mode (see the message)."""


@dataclass(frozen=True)
class HostTscSupport:
    """What this host's KVM can do for guest time."""

    host_khz: int
    hardware_scaling: bool      # KVM_CAP_TSC_CONTROL
    vm_scoped: bool             # KVM_CAP_VM_TSC_CONTROL: set the rate before vCPUs exist
    fmt: RatioFormat            # the vendor's ratio format
    invariant_tsc: bool         # CPUID 0x80000007 EDX[8] as KVM reports it
    tsc_deadline: bool          # KVM_CAP_TSC_DEADLINE_TIMER
    tolerance_ppm: int = DEFAULT_TOLERANCE_PPM

    @classmethod
    def probe(cls, vm: Vm, vcpu: Vcpu | None = None) -> "HostTscSupport":
        """Ask KVM (system and VM scope) what it supports."""
        kvm = vm.kvm

        def cap(name: str) -> bool:
            return max(kvm.check_extension(Cap[name]), vm.check_extension(Cap[name])) > 0

        host_khz = host_tsc_khz(vm, vcpu)
        supported = kvm.supported_cpuid()
        leaf0 = find(supported, 0)
        vendor = (struct.pack("<III", leaf0.ebx, leaf0.edx, leaf0.ecx).decode("ascii", "replace")
                  if leaf0 else "")
        try:
            fmt = format_for_vendor(vendor)
        except TscError:
            fmt = INTEL
        pm = find(supported, 0x80000007)
        return cls(host_khz=host_khz, hardware_scaling=cap("TSC_CONTROL"),
                   vm_scoped=cap("VM_TSC_CONTROL"), fmt=fmt,
                   invariant_tsc=bool(pm and pm.edx >> 8 & 1),
                   tsc_deadline=cap("TSC_DEADLINE_TIMER"))

    def describe(self) -> str:
        scaling = (f"hardware TSC scaling ({self.fmt} ratio)" if self.hardware_scaling
                   else "no hardware TSC scaling (KVM_CAP_TSC_CONTROL is 0)")
        return (f"host TSC {self.host_khz} kHz, {scaling}, "
                f"VM-scoped KVM_SET_TSC_KHZ {'yes' if self.vm_scoped else 'no'}, "
                f"invariant TSC {'yes' if self.invariant_tsc else 'no'}")


def host_tsc_khz(vm: Vm, vcpu: Vcpu | None = None) -> int:
    """The host TSC rate KVM uses: the VM's default (KVM_GET_TSC_KHZ on the
    VM), or a vCPU's rate on kernels without the VM-scoped call."""
    try:
        return vm.get_tsc_khz()
    except KvmError:
        if vcpu is None:
            if not vm.vcpus:
                raise ConfigError("cannot learn the host TSC rate: KVM_GET_TSC_KHZ on the VM "
                                  "failed and the VM has no vCPU to ask") from None
            vcpu = vm.vcpus[0]
        return vcpu.get_tsc_khz()


def timing_leaves(entries: Sequence[CpuidEntry], khz: int,
                  apic_bus_khz: int = KVM_APIC_BUS_KHZ) -> list[CpuidEntry]:
    """CPUID with the guest TSC frequency in every leaf guests consult:
    0x15 (crystal ratio: EBX/EAX x ECX Hz), 0x16 (base/max MHz), and the
    hypervisor timing leaf 0x40000010; raises the max-leaf values so the
    guest looks at them."""
    if not 0 < khz < 1 << 32:
        raise TscError(f"TSC frequency {khz} kHz does not fit CPUID leaf 0x15/0x40000010")
    out = [replace(e) for e in entries
           if e.function not in (LEAF_TSC_CRYSTAL, LEAF_FREQUENCY, LEAF_TIMING)]
    mhz = max(1, (khz + 500) // 1000)
    # 1 kHz "crystal" x khz / 1: exact to the kHz for any rate below 4.29 THz.
    out.append(CpuidEntry(LEAF_TSC_CRYSTAL, eax=1, ebx=khz, ecx=1000))
    out.append(CpuidEntry(LEAF_FREQUENCY, eax=mhz & 0xFFFF, ebx=mhz & 0xFFFF, ecx=BUS_MHZ))
    out.append(CpuidEntry(LEAF_TIMING, eax=khz, ebx=apic_bus_khz))
    leaf0 = find(out, 0)
    if leaf0 is None:
        out.append(CpuidEntry(0, eax=LEAF_FREQUENCY))
    elif leaf0.eax < LEAF_FREQUENCY:
        leaf0.eax = LEAF_FREQUENCY
    hv = find(out, LEAF_HYPERVISOR)
    if hv is None:
        out.append(CpuidEntry(LEAF_HYPERVISOR, eax=LEAF_TIMING))
    elif hv.eax < LEAF_TIMING:
        hv.eax = LEAF_TIMING
    return out


def tsc_khz_from_cpuid(entries: Sequence[CpuidEntry]) -> int | None:
    """The TSC rate a guest would derive from CPUID (0x40000010, then 0x15)."""
    t = find(entries, LEAF_TIMING)
    if t is not None and t.eax:
        return t.eax
    c = find(entries, LEAF_TSC_CRYSTAL)
    if c is not None and c.eax and c.ebx and c.ecx:
        return c.ecx * c.ebx // c.eax // 1000
    return None


@dataclass
class SyncReport:
    """The vCPUs' TSCs right after a synchronizing write."""

    target: int
    values: list[int]            # IA32_TSC read back per vCPU
    skew_cycles: list[int]       # each vCPU against vCPU 0, corrected for read timing
    honoured: bool               # the vCPUs read the written value (plus the time since)

    @property
    def max_skew(self) -> int:
        return max((abs(s) for s in self.skew_cycles), default=0)


@dataclass
class ClockReport:
    """What ``GuestClock.apply`` did and what the vCPUs now report."""

    plan: TscPlan
    support: HostTscSupport
    vcpu_khz: list[int]          # KVM_GET_TSC_KHZ per vCPU after programming
    cpuid_khz: int | None        # what the guest derives from CPUID
    sync: SyncReport | None
    warnings: list[str] = field(default_factory=list)

    def describe(self) -> str:
        lines = [self.support.describe(), self.plan.describe(),
                 f"vCPU TSC kHz: {self.vcpu_khz}; CPUID says {self.cpuid_khz} kHz"]
        if self.sync is not None:
            lines.append(f"TSC sync to {self.sync.target}: "
                         f"{'honoured' if self.sync.honoured else 'ignored by this host'}, "
                         f"max skew {self.sync.max_skew} cycles")
        return "\n".join(lines + self.warnings)


class GuestClock:
    """The guest TSC frequency of one VM, applied to every vCPU.

    >>> clock = GuestClock(machine.vm, khz=2_000_000)   # after MicroVM(...)
    >>> report = clock.apply()                          # before machine.start()
    """

    def __init__(self, vm: Vm, khz: int | None = None, *, vcpus: Sequence[Vcpu] | None = None,
                 support: HostTscSupport | None = None, cpuid: bool = True,
                 sync: bool = True) -> None:
        self.vm = vm
        self.vcpus = list(vm.vcpus if vcpus is None else vcpus)
        self.support = support or HostTscSupport.probe(vm, self.vcpus[0] if self.vcpus else None)
        self.khz = self.support.host_khz if khz is None else khz
        self.cpuid = cpuid
        self.sync = sync
        # Decided now: a request the host cannot serve fails before any ioctl.
        self.plan = plan(self.khz, self.support.host_khz,
                         hardware_scaling=self.support.hardware_scaling,
                         fmt=self.support.fmt, tolerance_ppm=self.support.tolerance_ppm)

    def apply(self) -> ClockReport:
        """Program the frequency (VM scope where supported, then every
        vCPU), the CPUID leaves, and synchronized TSC values."""
        notes: list[str] = []
        if self.plan.mode is TscMode.CATCHUP:
            msg = catchup_meaning(self.khz, self.support.host_khz)
            warnings.warn(TscCatchupWarning(msg), stacklevel=2)
            notes.append("warning: " + msg)
        if self.support.vm_scoped:
            # Covers vCPUs created later (hot-plug) on hosts that support it.
            self.vm.set_tsc_khz(self.khz)
        for vcpu in self.vcpus:
            try:
                vcpu.set_tsc_khz(self.khz)
            except KvmError as exc:
                raise TscError(f"KVM refused guest TSC {self.khz} kHz on vCPU {vcpu.id} "
                               f"(host {self.support.host_khz} kHz, planned "
                               f"{self.plan.mode.value}): {exc}") from exc
        vcpu_khz = [v.get_tsc_khz() for v in self.vcpus]
        cpuid_khz = None
        if self.cpuid:
            for vcpu in self.vcpus:
                entries = timing_leaves(vcpu.get_cpuid2(), self.khz)
                vcpu.set_cpuid2(entries)
            cpuid_khz = tsc_khz_from_cpuid(self.vcpus[0].get_cpuid2()) if self.vcpus else None
        report = None
        if self.sync and self.vcpus:
            report = sync_tsc(self.vcpus, khz=self.khz)
            if not report.honoured:
                notes.append("note: this host ignores IA32_TSC writes; the vCPUs share the "
                             "raw host TSC")
        return ClockReport(self.plan, self.support, vcpu_khz, cpuid_khz, report, notes)


def read_tsc(vcpus: Sequence[Vcpu]) -> list[tuple[int, int]]:
    """(IA32_TSC, host monotonic ns at the read) per vCPU."""
    out = []
    for v in vcpus:
        value = v.get_msrs([MSR_IA32_TSC])[MSR_IA32_TSC]
        out.append((value, time.monotonic_ns()))
    return out


def sync_tsc(vcpus: Sequence[Vcpu], target: int | None = None, *, khz: int) -> SyncReport:
    """Write one IA32_TSC value to every vCPU back to back (KVM treats
    host writes of one value within a second as a synchronization and gives
    the vCPUs one offset), then read them back. ``target`` defaults to
    vCPU 0's current value so no vCPU's TSC moves far."""
    if target is None:
        target = read_tsc(vcpus[:1])[0][0]
    t0 = time.monotonic_ns()
    for v in vcpus:
        v.set_msrs({MSR_IA32_TSC: target})
    reads = read_tsc(vcpus)
    elapsed_cycles = (reads[-1][1] - t0) * khz // 1_000_000
    # Honoured if vCPU 0 reads the target plus at most the time since the write
    # (with 10 ms of slack for a descheduled thread).
    slack = 10_000 * khz // 1000
    honoured = 0 <= reads[0][0] - target <= elapsed_cycles + slack
    base_val, base_ns = reads[0]
    skew = [val - base_val - (ns - base_ns) * khz // 1_000_000 for val, ns in reads]
    return SyncReport(target, [r[0] for r in reads], skew, honoured)


def tsc_writes_honoured(kvm: Any) -> bool:
    """Whether this host's KVM applies a host-initiated IA32_TSC write (some
    nested hosts accept and ignore it). Probed on a scratch VM: a write 2**40
    cycles ahead must read back at least that far ahead."""
    vm = kvm.create_vm()
    try:
        vcpu = vm.create_vcpu(0)
        before = vcpu.get_msrs([MSR_IA32_TSC])[MSR_IA32_TSC]
        target = (before + (1 << 40)) & ((1 << 64) - 1)
        vcpu.set_msrs({MSR_IA32_TSC: target})
        after = vcpu.get_msrs([MSR_IA32_TSC])[MSR_IA32_TSC]
        return 0 <= after - target < 1 << 39
    finally:
        vm.close()


# -- saved state -----------------------------------------------------------

def get_clock_data(vm: Vm) -> dict[str, int]:
    """KVM_GET_CLOCK with every field (kvmclock ns, flags, realtime, host TSC)."""
    buf = bytearray(_native.SIZES["clock_data"])
    _native.ioctl_buf(vm.fd, _native.IOCTLS["GET_CLOCK"], buf, "KVM_GET_CLOCK")
    clock, flags, _pad, realtime, host_tsc = _CLOCK_DATA.unpack_from(buf)
    return {"clock": clock, "flags": flags, "realtime": realtime, "host_tsc": host_tsc}


def set_clock(vm: Vm, ns: int) -> None:
    """KVM_SET_CLOCK: the kvmclock value the guest sees from now on."""
    buf = bytearray(_CLOCK_DATA.pack(ns, 0, 0, 0, 0))
    _native.ioctl_buf(vm.fd, _native.IOCTLS["SET_CLOCK"], buf, f"KVM_SET_CLOCK({ns})")


@dataclass
class VcpuTsc:
    vcpu: int
    tsc: int
    tsc_adjust: int | None
    khz: int


@dataclass
class TscState:
    """A VM's time state, saved so a restore can keep guest time monotonic."""

    VERSION = 1
    vcpus: list[VcpuTsc]
    kvmclock_ns: int
    host_realtime_ns: int
    host_monotonic_ns: int
    host_khz: int

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.VERSION, "vcpus": [asdict(v) for v in self.vcpus],
                "kvmclock_ns": self.kvmclock_ns, "host_realtime_ns": self.host_realtime_ns,
                "host_monotonic_ns": self.host_monotonic_ns, "host_khz": self.host_khz}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TscState":
        if d.get("version") != cls.VERSION:
            raise ConfigError(f"TSC state version {d.get('version')!r} is not "
                              f"{cls.VERSION}, the one this hvkit reads")
        try:
            vcpus = [VcpuTsc(int(v["vcpu"]), int(v["tsc"]),
                             None if v["tsc_adjust"] is None else int(v["tsc_adjust"]),
                             int(v["khz"])) for v in d["vcpus"]]
            return cls(vcpus, int(d["kvmclock_ns"]), int(d["host_realtime_ns"]),
                       int(d["host_monotonic_ns"]), int(d["host_khz"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"TSC state is malformed: {exc!r}") from None


def save_tsc_state(vm: Vm, vcpus: Sequence[Vcpu] | None = None) -> TscState:
    """Capture every vCPU's TSC, TSC_ADJUST and rate, and the kvmclock (the
    VM should be paused so the values belong together)."""
    vcpus = list(vm.vcpus if vcpus is None else vcpus)
    out = []
    for v in vcpus:
        try:
            msrs = v.get_msrs([MSR_IA32_TSC, MSR_IA32_TSC_ADJUST])
            adjust: int | None = msrs[MSR_IA32_TSC_ADJUST]
        except KvmError:
            msrs = v.get_msrs([MSR_IA32_TSC])
            adjust = None
        out.append(VcpuTsc(v.id, msrs[MSR_IA32_TSC], adjust, v.get_tsc_khz()))
    return TscState(out, get_clock_data(vm)["clock"], time.time_ns(), time.monotonic_ns(),
                    host_tsc_khz(vm, vcpus[0] if vcpus else None))


@dataclass
class RestoreReport:
    """What a restore asked for and what the vCPUs read afterwards."""

    target_tsc: int
    values: list[int]
    honoured: bool           # the vCPUs read the target (plus the time since the write)
    monotonic: bool          # no vCPU reads less than it had when saved
    elapsed_ns: int


def restore_tsc_state(vm: Vm, state: TscState, vcpus: Sequence[Vcpu] | None = None, *,
                      advance: bool = True) -> RestoreReport:
    """Put the saved TSC state back: one rate and one TSC value on every
    vCPU (the highest saved value, so none goes backwards), plus the wall
    time since the save if ``advance`` (otherwise the guest does not see
    the time it spent saved). Call before the VM runs again."""
    vcpus = list(vm.vcpus if vcpus is None else vcpus)
    by_id = {v.vcpu: v for v in state.vcpus}
    missing = [v.id for v in vcpus if v.id not in by_id]
    if missing:
        raise ConfigError(f"TSC state has no entry for vCPU(s) {missing}; "
                          f"it holds {sorted(by_id)}")
    khz = by_id[vcpus[0].id].khz
    elapsed = max(0, time.time_ns() - state.host_realtime_ns) if advance else 0
    target = max(v.tsc for v in state.vcpus) + elapsed * khz // 1_000_000
    GuestClock(vm, khz, vcpus=vcpus, cpuid=False, sync=False).apply()
    for v in vcpus:
        adjust = by_id[v.id].tsc_adjust
        if adjust is not None:
            v.set_msrs({MSR_IA32_TSC_ADJUST: adjust})
    report = sync_tsc(vcpus, target, khz=khz)
    set_clock(vm, state.kvmclock_ns + elapsed)
    monotonic = all(val >= by_id[v.id].tsc for v, val in zip(vcpus, report.values))
    return RestoreReport(target, report.values, report.honoured, monotonic, elapsed)
