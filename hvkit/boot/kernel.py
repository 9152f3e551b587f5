"""Which Linux boot path a kernel takes, by its format.

Kept apart from hvkit.boot.linux (what every loader shares) so the loaders
import that module and this one imports the loaders, without a cycle.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Sequence

from hvkit.boot.bzimage import is_bzimage, load_bzimage
from hvkit.boot.extract import extract_vmlinux
from hvkit.boot.linux import LinuxBoot, default_e820, read_initrd, read_kernel
from hvkit.boot.pvh import load_pvh
from hvkit.errors import GuestLoadError

if TYPE_CHECKING:
    from hvkit.memory.guest import GuestMemory


def load_linux(memory: "GuestMemory", kernel: bytes | str | os.PathLike, cmdline: str,
               initrd: bytes | str | os.PathLike | None = None,
               e820: Sequence[tuple[int, int, int]] | None = None, *,
               boot: str = "auto") -> LinuxBoot:
    """Load a Linux kernel by its format.

    ``boot="auto"`` boots an ELF vmlinux through PVH and a bzImage through
    the 64-bit boot protocol; ``boot="pvh"`` also takes a bzImage, pulls the
    vmlinux out of it in the VMM (skipping the in-guest decompressor, which
    is slow where guest kernel code is emulated) and boots that through PVH;
    ``boot="bzimage"`` insists on the boot protocol.
    """
    if boot not in ("auto", "pvh", "bzimage"):
        raise GuestLoadError(f"boot method {boot!r} is not one of auto, pvh, bzimage")
    data, name = read_kernel(kernel)
    initrd_bytes = read_initrd(initrd)
    if e820 is None:
        e820 = default_e820(memory)
    if data[:4] == b"\x7fELF":
        if boot == "bzimage":
            raise GuestLoadError(f"{name}: is an ELF vmlinux; boot='bzimage' needs a bzImage")
        return load_pvh(memory, data, cmdline, initrd_bytes, e820, name=name)
    if not is_bzimage(data):
        raise GuestLoadError(f"{name}: neither an ELF vmlinux nor a bzImage (first bytes "
                             f"{data[:8].hex()}, no 'HdrS' at 0x202)")
    if boot == "pvh":
        vmlinux = extract_vmlinux(data, name)
        result = load_pvh(memory, vmlinux, cmdline, initrd_bytes, e820, name=name)
        result.notes.append("vmlinux extracted from the bzImage by the VMM")
        return result
    return load_bzimage(memory, data, cmdline, initrd_bytes, e820, name=name)
