"""MSR values a vCPU should start with, as firmware would leave them."""
from __future__ import annotations

from hvkit.arch.x86.registers import (MISC_ENABLE_FAST_STRING, MSR_CSTAR, MSR_IA32_MISC_ENABLE,
                                      MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_EIP,
                                      MSR_IA32_SYSENTER_ESP, MSR_KERNEL_GS_BASE, MSR_LSTAR,
                                      MSR_MTRR_DEF_TYPE, MSR_STAR, MSR_SYSCALL_MASK,
                                      MTRR_ENABLE, MTRR_TYPE_WB)


def boot_msrs() -> dict[int, int]:
    """System-call MSRs cleared, fast strings on, MTRRs enabled with
    write-back as the default type (Linux maps all RAM uncached otherwise)."""
    return {
        MSR_IA32_SYSENTER_CS: 0,
        MSR_IA32_SYSENTER_ESP: 0,
        MSR_IA32_SYSENTER_EIP: 0,
        MSR_STAR: 0,
        MSR_CSTAR: 0,
        MSR_KERNEL_GS_BASE: 0,
        MSR_SYSCALL_MASK: 0,
        MSR_LSTAR: 0,
        MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
        MSR_MTRR_DEF_TYPE: MTRR_ENABLE | MTRR_TYPE_WB,
    }
