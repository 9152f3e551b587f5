"""Typed Python face of the KVM uAPI (over the native layer in native/)."""
from hvkit.errors import KvmError
from hvkit.kvm.caps import Cap, ExitReason
from hvkit.kvm.exits import Exit
from hvkit.kvm.structs import CpuidEntry, DTable, Fpu, Lapic, Regs, Segment, Sregs, VcpuEvents, Xcrs
from hvkit.kvm.system import Kvm, kvm_usable
from hvkit.kvm.vcpu import Vcpu
from hvkit.kvm.vm import Vm

__all__ = ["Cap", "CpuidEntry", "DTable", "Exit", "ExitReason", "Fpu", "Kvm", "KvmError",
           "Lapic", "Regs", "Segment", "Sregs", "Vcpu", "VcpuEvents", "Vm", "Xcrs", "kvm_usable"]
