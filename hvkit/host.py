"""What this host offers hvkit: KVM capabilities, TSC, KSM, huge pages,
and which kind of KVM it is (bare metal, or nested and PVM-based)."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from hvkit.kvm.caps import Cap

# Capabilities worth showing a user, with what hvkit uses each for.
CAPS = {
    "USER_MEMORY": "guest RAM slots",
    "IRQCHIP": "in-kernel PIC/IOAPIC/LAPIC",
    "PIT2": "in-kernel PIT",
    "IRQFD": "interrupts from backends without the VMM",
    "IOEVENTFD": "doorbells to backends without the VMM",
    "SIGNAL_MSI": "MSI injection",
    "IRQ_ROUTING": "MSI routes for irqfd",
    "READONLY_MEM": "read-only guest memory",
    "MANUAL_DIRTY_LOG_PROTECT2": "dirty log clear (manual protect)",
    "SYNC_REGS": "registers in kvm_run",
    "IMMEDIATE_EXIT": "pause/stop of running vCPUs",
    "TSC_CONTROL": "hardware TSC scaling",
    "VM_TSC_CONTROL": "VM-wide TSC frequency",
    "GET_TSC_KHZ": "TSC frequency query",
    "X86_USER_SPACE_MSR": "MSR exits to user space",
    "X86_MSR_FILTER": "MSR filtering",
    "EXIT_HYPERCALL": "KVM_EXIT_HYPERCALL",
    "NR_VCPUS": "recommended vCPUs",
    "MAX_VCPUS": "maximum vCPUs",
    "NR_MEMSLOTS": "memory slots",
}

KSM_DIR = "/sys/kernel/mm/ksm"


@dataclass
class HostInfo:
    kvm_path: str
    kvm_usable: bool
    reason: str = ""
    api_version: int = 0
    capabilities: dict[str, int] = field(default_factory=dict)
    tsc_khz: int = 0
    kvm_flavor: str = "unknown"
    ksm_available: bool = False
    ksm_writable: bool = False
    hugepages_total: int = 0
    thp: str = ""
    features: dict[str, bool] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def kvm_flavor() -> str:
    """'pvm' on nested PVM-based KVM (kernel code emulated, user code
    native), 'kvm' otherwise."""
    if os.path.isdir("/sys/module/kvm_pvm"):
        return "pvm"
    if os.path.isdir("/sys/module/kvm_intel") or os.path.isdir("/sys/module/kvm_amd"):
        return "kvm"
    return "unknown"


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def probe(path: str = "/dev/kvm") -> HostInfo:
    from hvkit.kvm.system import Kvm, kvm_usable
    ok, reason = kvm_usable(path)
    info = HostInfo(path, ok, reason)
    info.kvm_flavor = kvm_flavor()
    info.ksm_available = os.path.exists(os.path.join(KSM_DIR, "run"))
    info.ksm_writable = info.ksm_available and os.access(os.path.join(KSM_DIR, "run"), os.W_OK)
    info.hugepages_total = int(_read("/proc/sys/vm/nr_hugepages") or 0)
    thp = _read("/sys/kernel/mm/transparent_hugepage/enabled")
    info.thp = thp[thp.find("[") + 1:thp.find("]")] if "[" in thp else thp
    if ok:
        with Kvm(path) as kvm:
            info.api_version = kvm.api_version
            for name in CAPS:
                info.capabilities[name] = kvm.check_extension(Cap[name])
            vm = kvm.create_vm()
            try:
                vcpu = vm.create_vcpu(0)
                info.tsc_khz = vcpu.get_tsc_khz()
            finally:
                vm.close()
    caps = info.capabilities
    info.features = {
        "microvm": ok,
        "smp": ok and caps.get("IRQCHIP", 0) > 0,
        "ioeventfd_irqfd": caps.get("IOEVENTFD", 0) > 0 and caps.get("IRQFD", 0) > 0,
        "readonly_memory": caps.get("READONLY_MEM", 0) > 0,
        "dirty_log_manual_protect": caps.get("MANUAL_DIRTY_LOG_PROTECT2", 0) > 0,
        "tsc_scaling": caps.get("TSC_CONTROL", 0) > 0,
        "user_space_msr": caps.get("X86_USER_SPACE_MSR", 0) > 0,
        "ksm_dedup": info.ksm_available and info.ksm_writable,
        "hugepages": info.hugepages_total > 0,
        "native_kernel_code": info.kvm_flavor == "kvm",
    }
    return info
