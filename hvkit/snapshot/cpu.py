"""Saving and loading a vCPU's whole state, and checking CPUID fits the host.

The order of the set calls follows what KVM needs (as Firecracker and
QEMU do): CPUID first, then MSRs, registers, special registers, XSAVE,
XCRs, debug registers, LAPIC, the TSC deadline (which needs the LAPIC in
deadline mode), MP state and pending events last, so that an event is not
lost to a later register write.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from hvkit.errors import KvmError
from hvkit.kvm.structs import CpuidEntry, Lapic, Regs, Sregs, VcpuEvents, Xcrs
from hvkit.snapshot.format import SnapshotError

if TYPE_CHECKING:
    from hvkit.kvm.system import Kvm
    from hvkit.kvm.vcpu import Vcpu

_readable: dict[int, list[int]] = {}

#: CPUID leaves whose feature bits a restored guest may rely on
FEATURE_LEAVES = ((1, 0, "ecx"), (1, 0, "edx"), (7, 0, "ebx"), (7, 0, "ecx"), (7, 0, "edx"),
                  (0xD, 1, "eax"), (0x80000001, 0, "ecx"), (0x80000001, 0, "edx"))


def readable_msrs(kvm: "Kvm", vcpu: "Vcpu") -> list[int]:
    """The MSRs of KVM's save list that this host lets us read (probed once)."""
    key = id(kvm)
    if key not in _readable:
        ok = []
        for index in kvm.msr_index_list():
            try:
                vcpu.get_msrs([index])
            except KvmError:
                continue
            ok.append(index)
        _readable[key] = ok
    return _readable[key]


def save_vcpu(vcpu: "Vcpu", msrs: Iterable[int]) -> dict[str, Any]:
    events = vcpu.get_vcpu_events()
    return {
        "id": vcpu.id,
        "regs": vcpu.get_regs().pack().hex(),
        "sregs": vcpu.get_sregs().pack().hex(),
        "xsave": vcpu.get_xsave().hex(),
        "xcrs": vcpu.get_xcrs().pack().hex(),
        "msrs": {f"{k:#x}": v for k, v in vcpu.get_msrs(list(msrs)).items()},
        "debugregs": vcpu.get_debugregs().hex(),
        "lapic": vcpu.get_lapic().pack().hex(),
        "mp_state": vcpu.get_mp_state(),
        "events": events.pack().hex(),
        "tsc_khz": vcpu.get_tsc_khz(),
    }


#: IA32_TSC_DEADLINE: KVM ignores a write unless the LAPIC timer is already
#: in TSC-deadline mode, so it goes in after the LAPIC (as QEMU does)
MSR_TSC_DEADLINE = 0x6E0


def load_vcpu(vcpu: "Vcpu", state: dict[str, Any], cpuid: list[CpuidEntry]) -> None:
    try:
        msrs = {int(k, 16): int(v) for k, v in state["msrs"].items()}
        deadline = msrs.pop(MSR_TSC_DEADLINE, None)
        vcpu.set_cpuid2(cpuid)
        vcpu.set_msrs(msrs)
        vcpu.set_regs(Regs.unpack(bytes.fromhex(state["regs"])))
        vcpu.set_sregs(Sregs.unpack(bytes.fromhex(state["sregs"])))
        vcpu.set_xsave(bytes.fromhex(state["xsave"]))
        vcpu.set_xcrs(Xcrs.unpack(bytes.fromhex(state["xcrs"])))
        vcpu.set_debugregs(bytes.fromhex(state["debugregs"]))
        vcpu.set_lapic(Lapic(bytes.fromhex(state["lapic"])))
        if deadline is not None:
            vcpu.set_msrs({MSR_TSC_DEADLINE: deadline})
        vcpu.set_mp_state(int(state["mp_state"]))
        vcpu.set_vcpu_events(VcpuEvents.unpack(bytes.fromhex(state["events"])))
    except (KeyError, ValueError, TypeError) as exc:
        raise SnapshotError(f"vCPU {vcpu.id}: saved state is damaged: {exc}") from None


MSR_IA32_TSC = 0x10


def tsc_took(vcpu: "Vcpu", state: dict[str, Any]) -> bool:
    """Did the host take the saved TSC (read it back: within a tenth of a
    second's worth of cycles)? Hosts that run guests on the raw host TSC
    accept the write and ignore it."""
    saved = state.get("msrs", {}).get(f"{MSR_IA32_TSC:#x}")
    if saved is None:
        return True
    try:
        now = vcpu.get_msrs([MSR_IA32_TSC])[MSR_IA32_TSC]
    except KvmError:
        return True
    return abs(now - int(saved)) < max(int(state.get("tsc_khz") or 0), 1) * 100


def cpuid_to_json(entries: Iterable[CpuidEntry]) -> list[list[int]]:
    return [[e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx] for e in entries]


def cpuid_from_json(rows: Any) -> list[CpuidEntry]:
    try:
        return [CpuidEntry(*(int(x) & 0xFFFFFFFF for x in row)) for row in rows]
    except (TypeError, ValueError) as exc:
        raise SnapshotError(f"saved CPUID is damaged: {exc}") from None


def missing_features(saved: list[CpuidEntry], host: list[CpuidEntry]) -> list[str]:
    """Feature bits the guest was shown that this host's KVM cannot give."""
    from hvkit.arch.x86.cpuid import FEATURES, find
    names = {(leaf, sub, reg, bit): name for name, (leaf, sub, reg, bit) in FEATURES.items()}
    out = []
    for leaf, sub, reg in FEATURE_LEAVES:
        a, b = find(saved, leaf, sub), find(host, leaf, sub)
        if a is None:
            continue
        have = getattr(b, reg) if b is not None else 0
        lost = getattr(a, reg) & ~have
        if leaf == 1 and reg == "ecx":
            lost &= ~(1 << 31 | 1 << 27)    # hypervisor, OSXSAVE: set by hvkit/the guest
        for bit in range(32):
            if lost >> bit & 1:
                out.append(names.get((leaf, sub, reg, bit), f"{leaf:#x}.{sub}.{reg}[{bit}]"))
    return out
