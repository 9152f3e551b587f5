"""Put a vCPU in real, 32-bit protected or 64-bit long mode at an entry point.

The VMM does the mode set-up instead of guest code because guest code at
CPL0 is emulated on nested hosts (about 250 ns an instruction): a few
ioctls here replace thousands of emulated instructions there.
"""
from __future__ import annotations

import functools
import struct
from typing import TYPE_CHECKING

from hvkit.arch.x86 import layout
from hvkit.arch.x86.registers import (CR0_ET, CR0_NE, CR0_PE, CR0_PG, CR4_OSFXSR,
                                      CR4_OSXMMEXCPT, CR4_PAE, EFER_LMA, EFER_LME,
                                      RFLAGS_RESERVED)
from hvkit.errors import ConfigError
from hvkit.kvm.structs import DTable, Regs, Segment, Sregs

if TYPE_CHECKING:
    from hvkit.kvm.vcpu import Vcpu
    from hvkit.memory.guest import GuestMemory

MODES = ("real", "protected", "long")

# GDT selectors written by write_gdt(): the 64-bit Linux boot protocol
# wants CS = 0x10 and DS = ES = SS = 0x18, flat.
SEL_CODE32 = 0x08
SEL_CODE64 = 0x10
SEL_DATA = 0x18

PTE_PRESENT = 1 << 0
PTE_WRITE = 1 << 1
PTE_USER = 1 << 2
PTE_PS = 1 << 7


def gdt_entry(base: int, limit: int, access: int, flags: int) -> int:
    """An 8-byte segment descriptor (flags: G, D/B, L, AVL nibble)."""
    return ((limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | ((access & 0xFF) << 40)
            | (((limit >> 16) & 0xF) << 48) | ((flags & 0xF) << 52) | (((base >> 24) & 0xFF) << 56))


GDT = (
    0,
    gdt_entry(0, 0xFFFFF, 0x9B, 0xC),   # 0x08: 32-bit code, DPL0
    gdt_entry(0, 0xFFFFF, 0x9B, 0xA),   # 0x10: 64-bit code, DPL0
    gdt_entry(0, 0xFFFFF, 0x93, 0xC),   # 0x18: data, DPL0
)


def segment_from_descriptor(selector: int, desc: int) -> Segment:
    """The KVM segment-register view of a GDT descriptor (must agree, or
    the guest sees different segments after reloading them)."""
    access = (desc >> 40) & 0xFF
    flags = (desc >> 52) & 0xF
    limit = (desc & 0xFFFF) | (((desc >> 48) & 0xF) << 16)
    g = (flags >> 3) & 1
    return Segment(
        base=((desc >> 16) & 0xFFFFFF) | (((desc >> 56) & 0xFF) << 24),
        limit=(limit << 12) | 0xFFF if g else limit,
        selector=selector, type=access & 0xF, present=(access >> 7) & 1,
        dpl=(access >> 5) & 3, db=(flags >> 2) & 1, s=(access >> 4) & 1,
        l=(flags >> 1) & 1, g=g, avl=flags & 1)


def write_gdt(memory: "GuestMemory") -> None:
    memory.write(layout.GDT_ADDR, struct.pack(f"<{len(GDT)}Q", *GDT))
    memory.write(layout.BOOT_IDT_ADDR, bytes(8))


@functools.lru_cache(maxsize=None)
def _identity_tables(gib: int) -> bytes:
    """PML4, PDPT and ``gib`` page directories, contiguous from PML4_ADDR."""
    flags = PTE_PRESENT | PTE_WRITE | PTE_USER
    out = bytearray(0x2000 + 0x1000 * gib)
    struct.pack_into("<Q", out, 0, layout.PDPT_ADDR | flags)
    for i in range(gib):
        struct.pack_into("<Q", out, 0x1000 + 8 * i, layout.PD_ADDR + 0x1000 * i | flags)
        struct.pack_into("<512Q", out, 0x2000 + 0x1000 * i,
                         *[((i << 30) + (j << 21)) | flags | PTE_PS for j in range(512)])
    return bytes(out)


def write_identity_page_tables(memory: "GuestMemory", gib: int = layout.PD_COUNT) -> int:
    """Identity-map the low ``gib`` GiB with 2 MiB pages; returns CR3.

    Entries are user-accessible so a guest may run CPL3 code on them before
    it installs tables of its own."""
    if not 1 <= gib <= layout.PD_COUNT:
        raise ConfigError(f"identity map covers 1 to {layout.PD_COUNT} GiB, not {gib}")
    memory.write(layout.PML4_ADDR, _identity_tables(gib))
    return layout.PML4_ADDR


def _flat(sregs: Sregs, code_sel: int) -> None:
    code = segment_from_descriptor(code_sel, GDT[code_sel >> 3])
    data = segment_from_descriptor(SEL_DATA, GDT[SEL_DATA >> 3])
    sregs.cs = code
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.gdt = DTable(layout.GDT_ADDR, len(GDT) * 8 - 1)
    sregs.idt = DTable(layout.BOOT_IDT_ADDR, 7)


def setup_mode(vcpu: "Vcpu", memory: "GuestMemory", mode: str, entry: int, *,
               stack: int = 0, regs: dict[str, int] | None = None,
               sregs: Sregs | None = None, write_tables: bool = True) -> tuple[Regs, Sregs]:
    """Set registers so the vCPU starts at ``entry`` in ``mode``.

    ``regs`` adds general-purpose registers (e.g. ``{"rsi": zero_page}``).
    Pass ``write_tables=False`` for the second and later vCPUs of a VM; the
    GDT and page tables are shared."""
    if mode not in MODES:
        raise ConfigError(f"CPU mode {mode!r} is not one of {', '.join(MODES)}")
    s = sregs if sregs is not None else vcpu.get_sregs()
    if mode == "real":
        if entry > 0xFFFFF:
            raise ConfigError(f"real-mode entry {entry:#x} is above 1 MiB")
        seg = entry & 0xF0000
        s.cs = Segment(base=seg, limit=0xFFFF, selector=seg >> 4, type=0xB, s=1)
        for name in ("ds", "es", "fs", "gs", "ss"):
            setattr(s, name, Segment(base=0, limit=0xFFFF, selector=0, type=0x3, s=1))
        s.cr0 = (s.cr0 & ~(CR0_PE | CR0_PG)) | CR0_ET
        s.cr4 = 0
        s.efer = 0
        ip = entry - seg
    else:
        if write_tables:
            write_gdt(memory)
        if mode == "protected":
            if entry > 0xFFFFFFFF:
                raise ConfigError(f"32-bit entry {entry:#x} is above 4 GiB")
            _flat(s, SEL_CODE32)
            s.cr0 = CR0_PE | CR0_ET | CR0_NE
            s.cr4 = 0
            s.efer = 0
        else:
            cr3 = write_identity_page_tables(memory) if write_tables else layout.PML4_ADDR
            _flat(s, SEL_CODE64)
            s.cr3 = cr3
            s.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
            s.cr0 = CR0_PE | CR0_PG | CR0_ET | CR0_NE
            s.efer = EFER_LME | EFER_LMA
        ip = entry
    vcpu.set_sregs(s)
    r = Regs(rip=ip, rsp=stack, rflags=RFLAGS_RESERVED)
    for name, value in (regs or {}).items():
        if not hasattr(r, name):
            raise ConfigError(f"unknown register {name!r}")
        setattr(r, name, value)
    vcpu.set_regs(r)
    return r, s
