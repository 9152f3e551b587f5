"""What every Linux loader shares: the result type, the e820 checks, the
initrd placement, and ``load_linux`` which picks the boot path by format."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

from hvkit.arch.x86.e820 import E820_RAM, E820_RESERVED  # noqa: F401 (re-exported)
from hvkit.boot import layout
from hvkit.files import read_regular
from hvkit.errors import GuestLoadError

if TYPE_CHECKING:
    from hvkit.memory.guest import GuestMemory



@dataclass
class LinuxBoot:
    """How to start the boot vCPU after a Linux loader has filled memory.

    ``mode`` is one of:

    - ``"long64"`` (bzImage, boot.rst "64-bit Boot Protocol"): 64-bit mode,
      paging on with an identity map covering the kernel (``kernel_start``
      to ``kernel_end``), the zero page and the command line; a GDT with
      flat 4 GiB descriptors for selectors 0x10 (code, CS) and 0x18 (data:
      DS, ES, SS); interrupts off; ``rip``/``rsi`` from ``regs``.
    - ``"pvh32"`` (PVH, Xen's docs/misc/pvh.pandoc): 32-bit protected mode,
      CR0.PE=1 and PG=0, CR4=0, flat 4 GiB 32-bit code and data segments,
      EFLAGS.IF and VM clear, TR a 32-bit TSS (base 0, limit 0x67);
      ``rip``/``rbx`` from ``regs``.

    The addresses say what was put where, for logs and tests.
    """

    mode: str
    entry: int
    kernel_start: int
    kernel_end: int
    cmdline_addr: int
    cmdline: str
    regs: dict[str, int]
    initrd_addr: int = 0
    initrd_size: int = 0
    boot_params_addr: int = 0       # bzImage: the zero page
    start_info_addr: int = 0        # PVH: hvm_start_info
    kernel_version: str = ""
    protocol: str = ""              # "2.15" (bzImage) or "pvh"
    notes: list[str] = field(default_factory=list)


def read_kernel(kernel: bytes | bytearray | memoryview | str | os.PathLike) -> tuple[bytes, str]:
    """(image bytes, a name for messages) from bytes or a path."""
    if isinstance(kernel, (bytes, bytearray, memoryview)):
        return bytes(kernel), "kernel image"
    path = os.fspath(kernel)
    return read_regular(path, "kernel image"), path


def read_initrd(initrd: bytes | bytearray | memoryview | str | os.PathLike | None) -> bytes | None:
    """The initrd's bytes, from bytes or a path; ``None`` stays ``None``."""
    if initrd is None:
        return None
    if isinstance(initrd, (bytes, bytearray, memoryview)):
        return bytes(initrd)
    return read_regular(initrd, "initrd")


def check_e820(memory: "GuestMemory", e820: Sequence[tuple[int, int, int]]) -> None:
    """Refuse a memory map that would lie to the guest: RAM entries that are
    not guest RAM, overlapping entries, or entries with no size."""
    spans = []
    for i, entry in enumerate(e820):
        if len(entry) != 3:
            raise GuestLoadError(f"e820 entry {i} is {entry!r}; expected (address, size, type)")
        addr, size, kind = entry
        if size <= 0 or addr < 0:
            raise GuestLoadError(f"e820 entry {i} [{addr:#x}, +{size:#x}) is empty or negative")
        if kind == E820_RAM and not memory.contains(addr, size):
            raise GuestLoadError(
                f"e820 entry {i} says [{addr:#x}, {addr + size:#x}) is RAM but guest RAM "
                f"does not cover it")
        spans.append((addr, addr + size, i))
    spans.sort()
    for (a0, a1, i), (b0, b1, j) in zip(spans, spans[1:]):
        if b0 < a1:
            raise GuestLoadError(f"e820 entries {i} [{a0:#x}, {a1:#x}) and {j} "
                                 f"[{b0:#x}, {b1:#x}) overlap")
    if not any(kind == E820_RAM for _, _, kind in e820):
        raise GuestLoadError("e820 map has no RAM entry")


def place_initrd(e820: Sequence[tuple[int, int, int]], size: int, *, low: int, limit: int,
                 name: str = "kernel") -> int:
    """The highest page-aligned address for an initrd of ``size`` bytes that
    lies in one e820 RAM entry, at or above ``low`` (the end of the kernel)
    and ending at or below ``limit`` (initrd_addr_max + 1, or 4 GiB).

    High, because the kernel decompresses and allocates upwards from its own
    image and Linux's boot protocol asks for the initrd near the top.
    """
    best = -1
    for addr, length, kind in e820:
        if kind != E820_RAM:
            continue
        top = min(addr + length, limit)
        start = (top - size) // layout.INITRD_ALIGN * layout.INITRD_ALIGN
        if start >= max(addr, low) and start > best:
            best = start
    if best < 0:
        raise GuestLoadError(
            f"{name}: no room for a {size}-byte initrd in guest RAM between {low:#x} "
            f"(end of the kernel) and {limit:#x} (highest address the kernel accepts); "
            f"give the VM more memory or use a smaller initrd")
    return best


def default_e820(memory: "GuestMemory") -> list[tuple[int, int, int]]:
    """The e820 map hvkit.arch.x86.e820 describes for ``memory`` (guest RAM
    with the legacy hole below 1 MiB reserved)."""
    from hvkit.arch.x86.e820 import e820_map
    return e820_map(memory)
