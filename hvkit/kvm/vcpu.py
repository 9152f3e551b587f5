"""A KVM vCPU: register state and the run call."""
from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING, Iterable, Mapping

from hvkit import _native
from hvkit.kvm.exits import Exit, GuestExit, InterruptedExit, decode
from hvkit.kvm.caps import ExitReason
from hvkit.kvm.structs import (CpuidEntry, Fpu, Lapic, Regs, Sregs, VcpuEvents, Xcrs,
                               pack_cpuid2, pack_msrs, unpack_cpuid2, unpack_msrs)

if TYPE_CHECKING:
    from hvkit.kvm.vm import Vm

IOC = _native.IOCTLS
SIZES = _native.SIZES

MP_STATE_RUNNABLE = 0
MP_STATE_UNINITIALIZED = 1
MP_STATE_INIT_RECEIVED = 2
MP_STATE_HALTED = 3
MP_STATE_SIPI_RECEIVED = 4

GUESTDBG_ENABLE = 0x1
GUESTDBG_SINGLESTEP = 0x2


class Vcpu:
    """One vCPU. Every getter and setter is one ioctl (~6 us here): keep
    them off hot paths."""

    def __init__(self, vm: "Vm", vcpu_id: int, fd: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        self.fd = fd
        self.runner = _native.VcpuRunner(fd, vcpu_id, vm.kvm.vcpu_mmap_size, vm.native)

    def _get(self, name: str, size: int) -> bytearray:
        buf = bytearray(size)
        _native.ioctl_buf(self.fd, IOC[f"GET_{name}"], buf, f"KVM_GET_{name}(vcpu {self.id})")
        return buf

    def _set(self, name: str, data: bytes | bytearray) -> None:
        _native.ioctl_buf(self.fd, IOC[f"SET_{name}"], bytearray(data),
                          f"KVM_SET_{name}(vcpu {self.id})")

    def get_regs(self) -> Regs:
        return Regs.unpack(self._get("REGS", SIZES["regs"]))

    def set_regs(self, regs: Regs) -> None:
        self._set("REGS", regs.pack())

    def get_sregs(self) -> Sregs:
        return Sregs.unpack(self._get("SREGS", SIZES["sregs"]))

    def set_sregs(self, sregs: Sregs) -> None:
        self._set("SREGS", sregs.pack())

    def get_fpu(self) -> Fpu:
        return Fpu.unpack(self._get("FPU", SIZES["fpu"]))

    def set_fpu(self, fpu: Fpu) -> None:
        self._set("FPU", fpu.pack())

    def get_xsave(self) -> bytes:
        return bytes(self._get("XSAVE", SIZES["xsave"]))

    def set_xsave(self, data: bytes) -> None:
        self._set("XSAVE", data)

    def get_xcrs(self) -> Xcrs:
        return Xcrs.unpack(self._get("XCRS", SIZES["xcrs"]))

    def set_xcrs(self, xcrs: Xcrs) -> None:
        self._set("XCRS", xcrs.pack())

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """Read MSRs; raises if KVM could not read all of them."""
        idx = list(indices)
        buf = pack_msrs((i, 0) for i in idx)
        n = _native.ioctl_buf(self.fd, IOC["GET_MSRS"], buf, f"KVM_GET_MSRS(vcpu {self.id})")
        if n != len(idx):
            from hvkit.errors import KvmError
            raise KvmError(f"KVM_GET_MSRS(vcpu {self.id})", 22,
                           f"MSR {idx[n]:#x} cannot be read ({n} of {len(idx)} read)")
        return unpack_msrs(buf, n)

    def set_msrs(self, values: Mapping[int, int]) -> None:
        items = list(values.items())
        buf = pack_msrs(items)
        n = _native.ioctl_buf(self.fd, IOC["SET_MSRS"], buf, f"KVM_SET_MSRS(vcpu {self.id})")
        if n != len(items):
            from hvkit.errors import KvmError
            raise KvmError(f"KVM_SET_MSRS(vcpu {self.id})", 22,
                           f"MSR {items[n][0]:#x} was refused ({n} of {len(items)} set)")

    def set_cpuid2(self, entries: Iterable[CpuidEntry]) -> None:
        _native.ioctl_buf(self.fd, IOC["SET_CPUID2"], pack_cpuid2(entries),
                          f"KVM_SET_CPUID2(vcpu {self.id})")

    def set_cpuid2_raw(self, table: bytes) -> None:
        """KVM_SET_CPUID2 with an already packed kvm_cpuid2 (a cached table)."""
        _native.ioctl_buf(self.fd, IOC["SET_CPUID2"], bytearray(table),
                          f"KVM_SET_CPUID2(vcpu {self.id})")

    def get_cpuid2(self) -> list[CpuidEntry]:
        buf = pack_cpuid2([], capacity=256)
        _native.ioctl_buf(self.fd, IOC["GET_CPUID2"], buf, f"KVM_GET_CPUID2(vcpu {self.id})")
        return unpack_cpuid2(buf)

    def get_lapic(self) -> Lapic:
        return Lapic(bytes(self._get("LAPIC", SIZES["lapic_state"])))

    def set_lapic(self, lapic: Lapic) -> None:
        self._set("LAPIC", lapic.pack())

    def get_vcpu_events(self) -> VcpuEvents:
        return VcpuEvents.unpack(self._get("VCPU_EVENTS", SIZES["vcpu_events"]))

    def set_vcpu_events(self, events: VcpuEvents) -> None:
        self._set("VCPU_EVENTS", events.pack())

    def get_debugregs(self) -> bytes:
        """kvm_debugregs (db0-3, dr6, dr7, flags) as raw bytes, for snapshots."""
        return bytes(self._get("DEBUGREGS", SIZES["debugregs"]))

    def set_debugregs(self, data: bytes) -> None:
        if len(data) != SIZES["debugregs"]:
            raise ValueError(f"kvm_debugregs is {SIZES['debugregs']} bytes, got {len(data)}")
        self._set("DEBUGREGS", data)

    def get_mp_state(self) -> int:
        return struct.unpack("<I", self._get("MP_STATE", 4))[0]

    def set_mp_state(self, state: int) -> None:
        self._set("MP_STATE", struct.pack("<I", state))

    def get_tsc_khz(self) -> int:
        return _native.ioctl_arg(self.fd, IOC["GET_TSC_KHZ"], 0, f"KVM_GET_TSC_KHZ(vcpu {self.id})")

    def set_tsc_khz(self, khz: int) -> None:
        _native.ioctl_arg(self.fd, IOC["SET_TSC_KHZ"], khz,
                          f"KVM_SET_TSC_KHZ(vcpu {self.id}, {khz})")

    def set_guest_debug(self, control: int, debugreg: Iterable[int] = ()) -> None:
        regs = list(debugreg) + [0] * (8 - len(list(debugreg)))
        buf = bytearray(struct.pack("<II8Q", control, 0, *regs[:8]))
        _native.ioctl_buf(self.fd, IOC["SET_GUEST_DEBUG"], buf,
                          f"KVM_SET_GUEST_DEBUG(vcpu {self.id})")

    def translate(self, gva: int) -> tuple[int, bool]:
        """(guest-physical address, valid) for a guest-virtual address."""
        buf = bytearray(struct.pack("<QQBBBB4x", gva, 0, 0, 0, 0, 0))
        _native.ioctl_buf(self.fd, IOC["TRANSLATE"], buf, f"KVM_TRANSLATE(vcpu {self.id})")
        _, gpa, valid, _, _, _ = struct.unpack("<QQBBBB4x", buf)
        return gpa, bool(valid)

    # -- running -------------------------------------------------------------
    def run(self) -> Exit:
        """Run until an exit that natively served devices do not absorb."""
        rc = self.runner.run()
        if rc == _native.RUN_INTERRUPTED:
            return InterruptedExit(ExitReason.INTR)
        if rc == _native.RUN_GUEST_EXIT:
            return GuestExit(ExitReason.IO, self.vm.native.exit_code)
        return decode(self.runner, self.runner.exit_reason)

    def stats(self) -> dict:
        """KVM's counters for this vCPU (``exits`` counts every exit, also
        the ones the kernel handles without user space)."""
        from hvkit.kvm.stats import Stats
        if getattr(self, "_stats", None) is None:
            self._stats = Stats(self.fd)
        return self._stats.read()

    def complete_msr(self, data: int = 0, error: bool = False) -> None:
        """Answer an X86_RDMSR/WRMSR exit before the next run."""
        self.runner.write_raw(32, struct.pack("<B", 1 if error else 0))
        self.runner.write_raw(32 + 16, struct.pack("<Q", data))

    def setup_mce(self, banks: int, flags: int = 0) -> int:
        """KVM_X86_SETUP_MCE: give the vCPU ``banks`` machine-check banks
        (1-32, at most what KVM supports) and MCG_CAP ``flags`` (bits 8 and
        up, those KVM supports). Returns the MCG_CAP set."""
        from hvkit.errors import ConfigError
        from hvkit.kvm.ioctls import X86_SETUP_MCE
        supported = self.vm.kvm.mce_cap_supported()
        if not 1 <= banks <= min(32, supported & 0xFF):
            raise ConfigError(f"{banks} MCE banks: this host's KVM gives 1 to "
                              f"{min(32, supported & 0xFF)}")
        if flags & 0xFF or flags & ~supported:
            raise ConfigError(f"MCG_CAP flags {flags:#x} are not among those KVM supports "
                              f"({supported & ~0xFF:#x})")
        cap = flags | banks
        _native.ioctl_buf(self.fd, X86_SETUP_MCE, bytearray(cap.to_bytes(8, "little")),
                          f"KVM_X86_SETUP_MCE({banks} banks)")
        return cap

    def kick(self) -> None:
        """Make a running vCPU return from ``run`` soon (from any thread)."""
        self.runner.kick()

    @property
    def immediate_exit(self) -> bool:
        return bool(self.runner.immediate_exit)

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        self.runner.immediate_exit = 1 if value else 0

    def close(self) -> None:
        if self.fd >= 0:
            if getattr(self, "_stats", None) is not None:
                self._stats.close()
                self._stats = None
            self.runner = None  # unmaps kvm_run
            os.close(self.fd)
            self.fd = -1
