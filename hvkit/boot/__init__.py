"""Guest loaders: freestanding ELF, Linux bzImage and PVH, initramfs.

``load_linux`` picks the Linux boot path by the kernel's format (see
``hvkit.boot.kernel``); the fixed guest-physical addresses the Linux loaders
use are in ``hvkit.boot.layout``.
"""
from hvkit.boot.kernel import load_linux
from hvkit.boot.linux import LinuxBoot

__all__ = ["LinuxBoot", "load_linux"]
