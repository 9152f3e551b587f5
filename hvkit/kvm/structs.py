"""KVM uAPI structures as Python dataclasses, packed to and from bytes.

The native layer only moves bytes; the layouts live here and are checked
against <linux/kvm.h> as the C compiler sees it: total sizes
(``check_sizes``) and the offset and size of every member we pack
(``check_offsets``, run when this module is imported), so neither a header
change nor a slip in a format string can silently corrupt a call.
"""
from __future__ import annotations

import re
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
XCR = struct.Struct("<IIQ")


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
            xcr, _, value = XCR.unpack_from(data, 8 + XCR.size * i)
            xcrs[xcr] = value
        return cls(xcrs, flags)

    def pack(self) -> bytes:
        out = bytearray(self.SIZE)
        struct.pack_into("<II", out, 0, len(self.xcrs), self.flags)
        for i, (xcr, value) in enumerate(sorted(self.xcrs.items())):
            XCR.pack_into(out, 8 + XCR.size * i, xcr, 0, value)
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


def field_layout(fmt: str | struct.Struct, base: int = 0) -> list[tuple[int, int]]:
    """(offset, size) of each value a little-endian, unaligned struct format
    packs, in order; pad bytes (``x``) take space but no entry. A ``Ns``
    is one value of N bytes, ``4B`` four values."""
    text = fmt.format if isinstance(fmt, struct.Struct) else fmt
    if not text or text[0] not in "<=":
        raise ValueError(f"layout format {text!r} must be little-endian without alignment ('<')")
    out, offset = [], base
    for count, code in re.findall(r"(\d*)([a-zA-Z?])", text[1:]):
        n = int(count) if count else 1
        if code == "x":
            offset += n
        elif code in "sp":
            out.append((offset, n))
            offset += n
        else:
            size = struct.calcsize("<" + code)
            for _ in range(n):
                out.append((offset, size))
                offset += size
    return out


def _seq(fmt: str | struct.Struct, names: str, base: int = 0) -> list[tuple[str, int, int]]:
    """Pair the members of a format with C member names (``-`` skips one)."""
    items = field_layout(fmt, base)
    names_ = names.split()
    if len(items) != len(names_):
        raise ValueError(f"{len(names_)} names for {len(items)} values of {fmt!r}")
    return [(n, o, z) for n, (o, z) in zip(names_, items) if n != "-"]


def layouts() -> dict[str, list[tuple[str, int, int]]]:
    """Every layout this module packs: struct -> [(C member, offset, size)]."""
    seg = Segment.FMT.size
    sregs = [(name, seg * i, seg) for i, name in enumerate(SEGMENT_NAMES)]
    sregs += [("gdt", 192, DTable.FMT.size), ("idt", 208, DTable.FMT.size)]
    sregs += _seq(Sregs.TAIL, "cr0 cr2 cr3 cr4 cr8 efer apic_base - - - -", 224)
    sregs.append(("interrupt_bitmap", 224 + 7 * 8, 4 * 8))
    return {
        "regs": _seq(Regs.FMT, " ".join(REG_NAMES)),
        "segment": _seq(Segment.FMT, "base limit selector type present dpl db s l g avl "
                                     "unusable"),
        "dtable": _seq(DTable.FMT, "base limit"),
        "sregs": sregs,
        "fpu": _seq(Fpu.FMT, "fpr fcw fsw ftwx last_opcode last_ip last_dp xmm mxcsr"),
        "vcpu_events": _seq(VcpuEvents.FMT, (
            "exception.injected exception.nr exception.has_error_code exception.pending "
            "exception.error_code interrupt.injected interrupt.nr interrupt.soft "
            "interrupt.shadow nmi.injected nmi.pending nmi.masked sipi_vector flags "
            "smi.smm smi.pending smi.smm_inside_nmi smi.latched_init triple_fault.pending "
            "exception_has_payload exception_payload")),
        "cpuid2": _seq("<I4x", "nent") + [("entries", 8, 0)],
        "cpuid_entry2": _seq(CpuidEntry.FMT, "function index flags eax ebx ecx edx"),
        "msrs": _seq("<I4x", "nmsrs") + [("entries", 8, 0)],
        "msr_entry": _seq(MSR_ENTRY, "index reserved data"),
        "xcrs": _seq("<II", "nr_xcrs flags") + [("xcrs", 8, 16 * 16)],
        "xcr": _seq(XCR, "xcr reserved value"),
        "lapic_state": [("regs", 0, Lapic.SIZE)],
    }


def check_offsets(c_fields: dict[tuple[str, str], tuple[int, int]],
                  extra: dict[str, list[tuple[str, int, int]]] | None = None) -> None:
    """Compare the offset and size of every member we pack with the C
    compiler's (``_native.FIELD_OFFSETS``); raise naming each mismatch.
    A size of 0 means a flexible array member, whose offset alone counts."""
    bad = []
    for st, members in {**layouts(), **(extra or {})}.items():
        for name, off, size in members:
            c = c_fields.get((st, name))
            if c is None:
                bad.append(f"{st}.{name}: not in the C table")
            elif c[0] != off or (size and c[1] != size):
                bad.append(f"kvm_{st}.{name}: ours at {off} ({size} bytes), "
                           f"<linux/kvm.h> at {c[0]} ({c[1]} bytes)")
    if bad:
        raise RuntimeError("KVM struct layouts do not match <linux/kvm.h>: " + "; ".join(bad))


def _check_at_import() -> None:
    try:
        from hvkit import _native
    except ImportError:   # no native extension: nothing to check against
        return
    check_sizes(_native.SIZES)
    check_offsets(_native.FIELD_OFFSETS)


__all__ = [
    "Regs", "Segment", "DTable", "Sregs", "Fpu", "VcpuEvents", "CpuidEntry",
    "Xcrs", "Lapic", "pack_cpuid2", "unpack_cpuid2", "pack_msrs", "unpack_msrs",
    "check_sizes", "check_offsets", "field_layout", "layouts"]

_check_at_import()
