"""Decoded vCPU exits: one small class per exit reason.

Decoding reads the kvm_run union (at offset 32) only for the reason at
hand, so the common exits cost one copy of a few bytes.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hvkit.kvm.caps import ExitReason

if TYPE_CHECKING:
    from hvkit._native import VcpuRunner

UNION = 32

INTERNAL_SUBERRORS = {
    1: "EMULATION",
    2: "SIMUL_EX",
    3: "DELIVERY_EV",
    4: "UNEXPECTED_EXIT_REASON",
}
SYSTEM_EVENTS = {1: "SHUTDOWN", 2: "RESET", 3: "CRASH", 4: "WAKEUP", 5: "SUSPEND", 6: "SEV_TERM"}
MSR_REASONS = {1: "INVAL", 2: "UNKNOWN", 4: "FILTER"}


@dataclass
class Exit:
    reason: ExitReason | int


@dataclass
class IoExit(Exit):
    port: int = 0
    size: int = 0
    count: int = 1
    is_out: bool = False
    data: bytes = b""


@dataclass
class MmioExit(Exit):
    address: int = 0
    size: int = 0
    is_write: bool = False
    data: bytes = b""


@dataclass
class HltExit(Exit):
    pass


@dataclass
class ShutdownExit(Exit):
    """A triple fault (or a shutdown the CPU could not deliver)."""


@dataclass
class FailEntryExit(Exit):
    hardware_entry_failure_reason: int = 0
    cpu: int = 0


@dataclass
class InternalErrorExit(Exit):
    suberror: int = 0
    data: list[int] = field(default_factory=list)
    #: the instruction KVM failed to emulate, when KVM reports it
    #: (suberror EMULATION with KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES)
    insn_bytes: bytes = b""

    @property
    def suberror_name(self) -> str:
        return INTERNAL_SUBERRORS.get(self.suberror, f"suberror {self.suberror}")

    @property
    def instruction(self) -> str:
        """The failing instruction's bytes in hex ("0f 01 ca"), or ""."""
        return self.insn_bytes.hex(" ")


EMULATION_FLAG_INSTRUCTION_BYTES = 1


def emulation_failure_bytes(suberror: int, ndata: int, raw: bytes) -> bytes:
    """The instruction bytes of a kvm_run.emulation_failure (u32 suberror,
    u32 ndata, u64 flags, u8 insn_size, u8 insn_bytes[15]); b"" if absent.
    ``insn_size`` comes from the kernel but is still bounded by 15."""
    if suberror != 1 or ndata < 3 or len(raw) < 32:
        return b""
    flags = struct.unpack_from("<Q", raw, 8)[0]
    if not flags & EMULATION_FLAG_INSTRUCTION_BYTES:
        return b""
    size = min(raw[16], 15)
    return bytes(raw[17:17 + size])


@dataclass
class HypercallExit(Exit):
    nr: int = 0
    args: tuple[int, ...] = ()
    ret: int = 0
    longmode: int = 0


@dataclass
class MsrExit(Exit):
    """X86_RDMSR / X86_WRMSR: answer with ``Vcpu.complete_msr``."""
    index: int = 0
    data: int = 0
    msr_reason: int = 0
    error: int = 0

    @property
    def is_write(self) -> bool:
        return self.reason == ExitReason.X86_WRMSR


@dataclass
class SystemEventExit(Exit):
    type: int = 0
    data: list[int] = field(default_factory=list)

    @property
    def type_name(self) -> str:
        return SYSTEM_EVENTS.get(self.type, f"event {self.type}")


@dataclass
class DebugExit(Exit):
    exception: int = 0
    pc: int = 0
    dr6: int = 0
    dr7: int = 0


@dataclass
class ExceptionExit(Exit):
    exception: int = 0
    error_code: int = 0


@dataclass
class UnknownExit(Exit):
    hardware_exit_reason: int = 0


@dataclass
class InterruptedExit(Exit):
    """KVM_RUN returned EINTR: a kick (pause, stop) or a signal."""


@dataclass
class GuestExit(Exit):
    """The guest wrote the exit port (served natively)."""
    code: int = 0


def decode(runner: "VcpuRunner", reason: int) -> Exit:
    """Decode the exit the runner just returned for Python."""
    try:
        r: ExitReason | int = ExitReason(reason)
    except ValueError:
        r = reason
    if reason == ExitReason.IO:
        is_out, size, port, count = runner.io()
        (off,) = struct.unpack("<Q", runner.raw(UNION + 8, 8))
        data = runner.raw(off, size * count) if is_out else b""
        return IoExit(r, port, size, count, is_out, data)
    if reason == ExitReason.MMIO:
        addr, size, is_write, data = runner.mmio()
        return MmioExit(r, addr, size, is_write, data if is_write else b"")
    if reason == ExitReason.HLT:
        return HltExit(r)
    if reason == ExitReason.SHUTDOWN:
        return ShutdownExit(r)
    if reason == ExitReason.FAIL_ENTRY:
        hw, cpu = struct.unpack("<QI", runner.raw(UNION, 12))
        return FailEntryExit(r, hw, cpu)
    if reason == ExitReason.INTERNAL_ERROR:
        sub, n = struct.unpack("<II", runner.raw(UNION, 8))
        n = min(n, 16)
        data = list(struct.unpack(f"<{n}Q", runner.raw(UNION + 8, 8 * n)))
        return InternalErrorExit(r, sub, data, emulation_failure_bytes(sub, n, runner.raw(UNION, 32)))
    if reason == ExitReason.HYPERCALL:
        vals = struct.unpack("<8QI", runner.raw(UNION, 68))
        return HypercallExit(r, vals[0], tuple(vals[1:7]), vals[7], vals[8])
    if reason in (ExitReason.X86_RDMSR, ExitReason.X86_WRMSR):
        error, msr_reason, index, data = struct.unpack("<B7xIIQ", runner.raw(UNION, 24))
        return MsrExit(r, index, data, msr_reason, error)
    if reason == ExitReason.SYSTEM_EVENT:
        typ, n = struct.unpack("<II", runner.raw(UNION, 8))
        n = min(n, 16)
        data = list(struct.unpack(f"<{n}Q", runner.raw(UNION + 8, 8 * n)))
        return SystemEventExit(r, typ, data)
    if reason == ExitReason.DEBUG:
        exc, pc, dr6, dr7 = struct.unpack("<I4xQQQ", runner.raw(UNION, 32))
        return DebugExit(r, exc, pc, dr6, dr7)
    if reason == ExitReason.EXCEPTION:
        exc, err = struct.unpack("<II", runner.raw(UNION, 8))
        return ExceptionExit(r, exc, err)
    (hw,) = struct.unpack("<Q", runner.raw(UNION, 8))
    return UnknownExit(r, hw)
