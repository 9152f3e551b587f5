"""The KVM system file descriptor (/dev/kvm)."""
from __future__ import annotations

import os
import struct
from functools import cached_property

from hvkit import _native
from hvkit.kvm.ioctls import X86_GET_MCE_CAP_SUPPORTED
from hvkit.errors import KvmError
from hvkit.kvm.caps import Cap
from hvkit.kvm.structs import (CpuidEntry, check_sizes, pack_cpuid2, pack_msrs,
                               unpack_cpuid2, unpack_msrs)

IOC = _native.IOCTLS
check_sizes(_native.SIZES)

KVM_API_VERSION = 12
E2BIG = 7


class Kvm:
    """/dev/kvm: capabilities, supported CPUID and MSRs, and VM creation."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise KvmError(f"open({path})", exc.errno) from None
        self.path = path
        try:
            version = self.api_version
            if version != KVM_API_VERSION:
                raise KvmError("KVM_GET_API_VERSION", 22,
                               f"API version {version}, hvkit needs {KVM_API_VERSION}")
        except BaseException:
            self.close()
            raise

    @property
    def api_version(self) -> int:
        return _native.ioctl_arg(self.fd, IOC["GET_API_VERSION"], 0, "KVM_GET_API_VERSION")

    def check_extension(self, cap: Cap | str | int) -> int:
        """KVM_CHECK_EXTENSION on the system fd: 0 when absent."""
        c = Cap.parse(cap)
        return _native.ioctl_arg(self.fd, IOC["CHECK_EXTENSION"], int(c),
                                 f"KVM_CHECK_EXTENSION({c.name})")

    def has(self, cap: Cap | str | int) -> bool:
        return self.check_extension(cap) > 0

    @cached_property
    def vcpu_mmap_size(self) -> int:
        return _native.ioctl_arg(self.fd, IOC["GET_VCPU_MMAP_SIZE"], 0,
                                 "KVM_GET_VCPU_MMAP_SIZE")

    def _cpuid_list(self, request: str) -> list[CpuidEntry]:
        n = 128
        while True:
            buf = pack_cpuid2([], capacity=n)
            try:
                _native.ioctl_buf(self.fd, IOC[request], buf, f"KVM_{request}")
            except KvmError as exc:
                if exc.errno == E2BIG and n < 4096:
                    n *= 2
                    continue
                raise
            return unpack_cpuid2(buf)

    @cached_property
    def _supported_cpuid(self) -> tuple[CpuidEntry, ...]:
        return tuple(self._cpuid_list("GET_SUPPORTED_CPUID"))

    def supported_cpuid(self) -> list[CpuidEntry]:
        """A fresh copy of KVM_GET_SUPPORTED_CPUID (callers may edit it)."""
        return [CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                for e in self._supported_cpuid]

    def emulated_cpuid(self) -> list[CpuidEntry]:
        return self._cpuid_list("GET_EMULATED_CPUID")

    def _msr_list(self, request: str) -> list[int]:
        n = 256
        while True:
            buf = bytearray(4 + 4 * n)
            struct.pack_into("<I", buf, 0, n)
            try:
                _native.ioctl_buf(self.fd, IOC[request], buf, f"KVM_{request}")
            except KvmError as exc:
                if exc.errno == E2BIG:
                    n = struct.unpack_from("<I", buf, 0)[0]
                    continue
                raise
            count = struct.unpack_from("<I", buf, 0)[0]
            return list(struct.unpack_from(f"<{count}I", buf, 4))

    def msr_index_list(self) -> list[int]:
        """MSRs that KVM saves and restores for a vCPU."""
        return self._msr_list("GET_MSR_INDEX_LIST")

    def msr_feature_index_list(self) -> list[int]:
        """Feature MSRs (read with ``feature_msrs``) that describe the host."""
        return self._msr_list("GET_MSR_FEATURE_INDEX_LIST")

    def feature_msrs(self, indices: list[int] | None = None) -> dict[int, int]:
        idx = self.msr_feature_index_list() if indices is None else list(indices)
        buf = pack_msrs((i, 0) for i in idx)
        n = _native.ioctl_buf(self.fd, IOC["GET_MSRS"], buf, "KVM_GET_MSRS(system)")
        return unpack_msrs(buf, n)

    def mce_cap_supported(self) -> int:
        """KVM_X86_GET_MCE_CAP_SUPPORTED: the MCG_CAP bits KVM can give a
        vCPU (bank count in bits 0-7)."""
        buf = bytearray(8)
        _native.ioctl_buf(self.fd, X86_GET_MCE_CAP_SUPPORTED, buf,
                          "KVM_X86_GET_MCE_CAP_SUPPORTED")
        return int.from_bytes(buf, "little")

    def create_vm(self, vm_type: int = 0) -> "Vm":
        from hvkit.kvm.vm import Vm
        fd = _native.ioctl_arg(self.fd, IOC["CREATE_VM"], vm_type, "KVM_CREATE_VM")
        return Vm(self, fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Kvm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def kvm_usable(path: str = "/dev/kvm") -> tuple[bool, str]:
    """(True, "") when a VM can be made here, else (False, the reason)."""
    if not os.path.exists(path):
        return False, f"{path} does not exist (KVM module not loaded or no virtualization)"
    if not os.access(path, os.R_OK | os.W_OK):
        return False, f"{path} is not readable and writable by this user"
    try:
        with Kvm(path) as kvm:
            vm = kvm.create_vm()
            vm.close()
    except OSError as exc:
        return False, f"{path} is present but unusable: {exc}"
    return True, ""
