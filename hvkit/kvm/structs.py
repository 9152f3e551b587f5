"""KVM uAPI structures as Python dataclasses, packed to and from bytes.

The native layer only moves bytes; the layouts live here and are checked
against the C compiler's sizes when the native module is loaded
(``check_sizes``), so a header change cannot silently corrupt a call.
"""
from __future__ import annotations

import struct
from dataclasses import astuple, dataclass, field, fields
from typing import ClassVar, Iterable

REG_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
             "rip", "rflags")


@dataclass
class Regs:
    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0x2

    FMT: ClassVar[struct.Struct] = struct.Struct("<18Q")

    @classmethod
    def unpack(cls, data: bytes) -> "Regs":
        return cls(*cls.FMT.unpack(data))

    def pack(self) -> bytes:
        return self.FMT.pack(*(getattr(self, n) for n in REG_NAMES))


@dataclass
class Segment:
    base: int = 0
    limit: int = 0xFFFF
    selector: int = 0
    type: int = 0
    present: int = 1
    dpl: int = 0
    db: int = 0
    s: int = 1
    l: int = 0
    g: int = 0
    avl: int = 0
    unusable: int = 0

    FMT: ClassVar[struct.Struct] = struct.Struct("<QIHBBBBBBBBBx")


@dataclass
class DTable:
    base: int = 0
    limit: int = 0

    FMT: ClassVar[struct.Struct] = struct.Struct("<QH6x")


SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


@dataclass
class Sregs:
    cs: Segment = field(default_factory=Segment)
    ds: Segment = field(default_factory=Segment)
    es: Segment = field(default_factory=Segment)
    fs: Segment = field(default_factory=Segment)
    gs: Segment = field(default_factory=Segment)
    ss: Segment = field(default_factory=Segment)
    tr: Segment = field(default_factory=Segment)
    ldt: Segment = field(default_factory=Segment)
    gdt: DTable = field(default_factory=DTable)
    idt: DTable = field(default_factory=DTable)
    cr0: int = 0
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0
    interrupt_bitmap: tuple[int, int, int, int] = (0, 0, 0, 0)

    TAIL: ClassVar[struct.Struct] = struct.Struct("<7Q4Q")
    SIZE: ClassVar[int] = 8 * 24 + 2 * 16 + 7 * 8 + 32

    @classmethod
    def unpack(cls, data: bytes) -> "Sregs":
        segs = [Segment(*Segment.FMT.unpack_from(data, 24 * i)) for i in range(8)]
        gdt = DTable(*DTable.FMT.unpack_from(data, 192))
        idt = DTable(*DTable.FMT.unpack_from(data, 208))
        t = cls.TAIL.unpack_from(data, 224)
        return cls(*segs, gdt, idt, *t[:7], tuple(t[7:]))

    def pack(self) -> bytes:
        out = bytearray(self.SIZE)
        for i, name in enumerate(SEGMENT_NAMES):
            g = getattr(self, name)
            Segment.FMT.pack_into(out, 24 * i, g.base, g.limit, g.selector, g.type, g.present,
                                  g.dpl, g.db, g.s, g.l, g.g, g.avl, g.unusable)
        DTable.FMT.pack_into(out, 192, self.gdt.base, self.gdt.limit)
        DTable.FMT.pack_into(out, 208, self.idt.base, self.idt.limit)
        self.TAIL.pack_into(out, 224, self.cr0, self.cr2, self.cr3, self.cr4,
                            self.cr8, self.efer, self.apic_base, *self.interrupt_bitmap)
        return bytes(out)


@dataclass
class Fpu:
    fpr: bytes = bytes(128)
    fcw: int = 0x37F
    fsw: int = 0
    ftwx: int = 0
    last_opcode: int = 0
    last_ip: int = 0
    last_dp: int = 0
    xmm: bytes = bytes(256)
    mxcsr: int = 0x1F80

    FMT: ClassVar[struct.Struct] = struct.Struct("<128sHHBxHQQ256sI4x")

    @classmethod
    def unpack(cls, data: bytes) -> "Fpu":
        return cls(*cls.FMT.unpack(data))

    def pack(self) -> bytes:
        return self.FMT.pack(*astuple(self))


@dataclass
class VcpuEvents:
    """kvm_vcpu_events: pending exceptions, interrupts, NMIs, SMM state."""
    exception_injected: int = 0
    exception_nr: int = 0
    exception_has_error_code: int = 0
    exception_pending: int = 0
    exception_error_code: int = 0
    interrupt_injected: int = 0
    interrupt_nr: int = 0
    interrupt_soft: int = 0
    interrupt_shadow: int = 0
    nmi_injected: int = 0
    nmi_pending: int = 0
    nmi_masked: int = 0
    sipi_vector: int = 0
    flags: int = 0
    smi_smm: int = 0
    smi_pending: int = 0
    smi_inside_nmi: int = 0
    smi_latched_init: int = 0
    triple_fault_pending: int = 0
    exception_has_payload: int = 0
    exception_payload: int = 0

    FMT: ClassVar[struct.Struct] = struct.Struct("<4BI4B3BxII4BB26xBQ")

    @classmethod
    def unpack(cls, data: bytes) -> "VcpuEvents":
        return cls(*cls.FMT.unpack(data))

    def pack(self) -> bytes:
        return self.FMT.pack(*astuple(self))


@dataclass
class CpuidEntry:
    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0

    FMT: ClassVar[struct.Struct] = struct.Struct("<7I12x")

    # kvm_cpuid_entry2.flags
    SIGNIFICANT_INDEX: ClassVar[int] = 1


def pack_cpuid2(entries: Iterable[CpuidEntry], capacity: int | None = None) -> bytearray:
    entries = list(entries)
    n = max(len(entries), capacity or 0)
    buf = bytearray(8 + CpuidEntry.FMT.size * n)
    struct.pack_into("<I", buf, 0, n if capacity else len(entries))
    pack, size = CpuidEntry.FMT.pack_into, CpuidEntry.FMT.size
    for i, e in enumerate(entries):
        pack(buf, 8 + size * i, e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
    return buf


def unpack_cpuid2(buf: bytes) -> list[CpuidEntry]:
    (n,) = struct.unpack_from("<I", buf, 0)
    size = CpuidEntry.FMT.size
    return [CpuidEntry(*CpuidEntry.FMT.unpack_from(buf, 8 + size * i)) for i in range(n)]


MSR_ENTRY = struct.Struct("<IIQ")


def pack_msrs(items: Iterable[tuple[int, int]]) -> bytearray:
    items = list(items)
    buf = bytearray(8 + MSR_ENTRY.size * len(items))
    struct.pack_into("<I", buf, 0, len(items))
    for i, (index, value) in enumerate(items):
        MSR_ENTRY.pack_into(buf, 8 + MSR_ENTRY.size * i, index, 0, value)
    return buf


def unpack_msrs(buf: bytes, count: int) -> dict[int, int]:
    out = {}
    for i in range(count):
        index, _, value = MSR_ENTRY.unpack_from(buf, 8 + MSR_ENTRY.size * i)
        out[index] = value
    return out


@dataclass
class Xcrs:
    xcrs: dict[int, int] = field(default_factory=dict)
    flags: int = 0

    SIZE: ClassVar[int] = 392

    @classmethod
    def unpack(cls, data: bytes) -> "Xcrs":
        n, flags = struct.unpack_from("<II", data, 0)
        xcrs = {}
        for i in range(min(n, 16)):
            xcr, _, value = struct.unpack_from("<IIQ", data, 8 + 16 * i)
            xcrs[xcr] = value
        return cls(xcrs, flags)

    def pack(self) -> bytes:
        out = bytearray(self.SIZE)
        struct.pack_into("<II", out, 0, len(self.xcrs), self.flags)
        for i, (xcr, value) in enumerate(sorted(self.xcrs.items())):
            struct.pack_into("<IIQ", out, 8 + 16 * i, xcr, 0, value)
        return bytes(out)


class Lapic:
    """The 1 KiB local APIC register page of kvm_lapic_state."""

    SIZE = 1024
    ID = 0x20
    LVT_LINT0 = 0x350
    LVT_LINT1 = 0x360
    SPURIOUS = 0xF0

    def __init__(self, data: bytes) -> None:
        if len(data) != self.SIZE:
            raise ValueError(f"LAPIC state must be {self.SIZE} bytes, got {len(data)}")
        self.data = bytearray(data)

    def get(self, offset: int) -> int:
        return struct.unpack_from("<I", self.data, offset)[0]

    def set(self, offset: int, value: int) -> None:
        struct.pack_into("<I", self.data, offset, value & 0xFFFFFFFF)

    @property
    def apic_id(self) -> int:
        return self.get(self.ID) >> 24

    def pack(self) -> bytes:
        return bytes(self.data)


def check_sizes(sizes: dict[str, int]) -> None:
    """Compare our layouts with the C sizes; raise on any mismatch."""
    ours = {
        "regs": Regs.FMT.size,
        "segment": Segment.FMT.size,
        "dtable": DTable.FMT.size,
        "sregs": Sregs.SIZE,
        "fpu": Fpu.FMT.size,
        "vcpu_events": VcpuEvents.FMT.size,
        "cpuid_entry2": CpuidEntry.FMT.size,
        "msr_entry": MSR_ENTRY.size,
        "xcrs": Xcrs.SIZE,
        "lapic_state": Lapic.SIZE,
    }
    bad = {k: (v, sizes[k]) for k, v in ours.items() if sizes.get(k) != v}
    if bad:
        raise RuntimeError(f"KVM struct layouts do not match <linux/kvm.h>: {bad}")


__all__ = [
    "Regs", "Segment", "DTable", "Sregs", "Fpu", "VcpuEvents", "CpuidEntry",
    "Xcrs", "Lapic", "pack_cpuid2", "unpack_cpuid2", "pack_msrs", "unpack_msrs",
    "check_sizes"]
