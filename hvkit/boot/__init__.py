"""Guest loaders: freestanding ELF, Linux bzImage and PVH, initramfs.

``load_linux`` picks the Linux boot path by the kernel's format (see
``hvkit.boot.linux``); the fixed guest-physical addresses the Linux loaders
use are in ``hvkit.boot.layout``.
"""
from hvkit.boot.linux import LinuxBoot, load_linux

__all__ = ["LinuxBoot", "load_linux"]
