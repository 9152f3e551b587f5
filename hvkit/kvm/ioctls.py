"""ioctl numbers hvkit computes itself, for calls that not every
<linux/kvm.h> the native layer is built against defines."""
from __future__ import annotations

KVMIO = 0xAE
IOC_WRITE, IOC_READ = 1, 2


def ioc(direction: int, nr: int, size: int) -> int:
    """An ioctl number the way <asm-generic/ioctl.h> makes it (type KVMIO)."""
    return direction << 30 | size << 16 | KVMIO << 8 | nr


X86_GET_MCE_CAP_SUPPORTED = ioc(IOC_READ, 0x9D, 8)   # _IOR(KVMIO, 0x9d, __u64)
X86_SETUP_MCE = ioc(IOC_WRITE, 0x9C, 8)              # _IOW(KVMIO, 0x9c, __u64)
