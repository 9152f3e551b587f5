"""The hvkit guest runtime's published layout, and the CPL3 entry built from it.

The runtime (guests/runtime) can set itself up: its ``_start`` fills the
GDT's TSS descriptors, the TSS, the IDT and per-vCPU data at CPL0, then
drops to CPL3. On nested hosts every CPL0 instruction is emulated, and that
set-up is most of a small guest's start-up (about a millisecond). So the
runtime also publishes where those structures live (``rt_layout``, version
1, described in guests/runtime/hvkit.h), and hvkit writes the same bytes
from the host and starts each vCPU at ``rt_user_start`` at CPL3. Images
without a matching ``rt_layout`` start at ``_start`` as before.

The layout comes from the image file (the user's, not the running guest),
but it is still checked here: every structure must lie inside the image,
every size must hold what the contract puts there.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from hvkit.arch.x86.modes import segment_from_descriptor
from hvkit.arch.x86.registers import (CR0_ET, CR0_NE, CR0_PE, CR0_PG, CR4_OSFXSR,
                                      CR4_OSXMMEXCPT, CR4_PAE, EFER_LMA, EFER_LME,
                                      RFLAGS_IOPL3, RFLAGS_RESERVED)
from hvkit.errors import GuestLoadError
from hvkit.kvm.structs import DTable, Regs, Segment, Sregs

if TYPE_CHECKING:
    from hvkit.boot.elf import ElfImage

SYMBOL = "rt_layout"
MAGIC = 0x54554F59414C5452          # "RTLAYOUT"
VERSION = 1
FIELDS = ("magic", "version", "max_cpus",
          "gdt", "gdt_size", "tss_index", "user_code", "user_data",
          "idt", "idt_size", "gates", "ngates",
          "tss", "tss_size", "iomap_offset", "iomap_bytes",
          "percpu", "percpu_size",
          "kstacks", "ustacks", "stack_size",
          "pml4", "user_entry")
LAYOUT = struct.Struct(f"<{len(FIELDS)}Q")
GATE = struct.Struct("<QHB5x")      # struct rt_gate: handler, vector, type
IDT_GATE = struct.Struct("<HHBBHII")
PERCPU = struct.Struct("<QII")      # self, cpu, apic_id
KERNEL_CODE = 0x08                  # the selector every gate uses
GATE_TYPES = (0x8E, 0x8F, 0xEE, 0xEF)   # present interrupt/trap gates, DPL 0 or 3
TSS_MIN = 104                       # the 64-bit TSS up to the I/O map base
TSS_BUSY = 0xB


@dataclass(frozen=True)
class RuntimeLayout:
    """``rt_layout`` of one image, checked; plus the gate table it points to."""
    max_cpus: int
    gdt: int
    gdt_size: int
    tss_index: int
    user_code: int
    user_data: int
    idt: int
    idt_size: int
    gates: tuple[tuple[int, int, int], ...]     # (vector, handler, type)
    tss: int
    tss_size: int
    iomap_offset: int
    iomap_bytes: int
    percpu: int
    percpu_size: int
    kstacks: int
    ustacks: int
    stack_size: int
    pml4: int
    user_entry: int
    code_segment: Segment
    data_segment: Segment

    @cached_property
    def idt_image(self) -> bytes:
        """The whole IDT, as the runtime's set-up would leave it."""
        out = bytearray(self.idt_size)
        for vector, handler, kind in self.gates:
            IDT_GATE.pack_into(out, 16 * vector, handler & 0xFFFF, KERNEL_CODE, 0, kind,
                               (handler >> 16) & 0xFFFF, handler >> 32, 0)
        return bytes(out)

    def tss_base(self, cpu: int) -> int:
        return self.tss + cpu * self.tss_size

    def tss_selector(self, cpu: int) -> int:
        return (self.tss_index + 2 * cpu) * 8

    def percpu_base(self, cpu: int) -> int:
        return self.percpu + cpu * self.percpu_size

    def cpu_writes(self, cpu: int, apic_id: int) -> list[tuple[int, bytes]]:
        """(address, bytes) the runtime's set-up writes for one vCPU: its
        TSS descriptor, TSS fields and per-vCPU block (the IDT is shared)."""
        self._check_cpu(cpu)
        base, limit = self.tss_base(cpu), self.tss_size - 1
        low = ((limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | ((0x80 | TSS_BUSY) << 40)
               | (((limit >> 16) & 0xF) << 48) | (((base >> 24) & 0xFF) << 56))
        percpu = self.percpu_base(cpu)
        return [
            (self.gdt + self.tss_selector(cpu), struct.pack("<QQ", low, base >> 32)),
            (base + 4, struct.pack("<Q", self.kstacks + (cpu + 1) * self.stack_size)),
            (base + 102, struct.pack("<H", self.iomap_offset)),
            (base + self.iomap_offset + self.iomap_bytes, b"\xff"),
            (percpu, PERCPU.pack(percpu, cpu, apic_id)),
        ]

    def entry_regs(self, cpu: int, ncpus: int, args_addr: int) -> Regs:
        """rt_user_start(cpu, ncpus, args) on the vCPU's user stack, IOPL 3,
        interrupts off: what _start's iretq leaves."""
        self._check_cpu(cpu)
        return Regs(rip=self.user_entry, rsp=self.ustacks + (cpu + 1) * self.stack_size,
                    rflags=RFLAGS_RESERVED | RFLAGS_IOPL3, rdi=cpu, rsi=ncpus, rdx=args_addr)

    def entry_sregs(self, sregs: Sregs, cpu: int) -> Sregs:
        """``sregs`` (the vCPU's, for its APIC base) set to the runtime's
        long mode at CPL3."""
        self._check_cpu(cpu)
        sregs.cs = self.code_segment
        sregs.ds = sregs.es = sregs.ss = self.data_segment
        sregs.fs = Segment(base=self.percpu_base(cpu), limit=0xFFFF, present=0, unusable=1)
        sregs.gs = Segment(limit=0xFFFF, present=0, unusable=1)
        sregs.tr = Segment(base=self.tss_base(cpu), limit=self.tss_size - 1,
                           selector=self.tss_selector(cpu), type=TSS_BUSY, s=0)
        sregs.gdt = DTable(self.gdt, self.gdt_size - 1)
        sregs.idt = DTable(self.idt, self.idt_size - 1)
        sregs.cr3 = self.pml4
        sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
        sregs.cr0 = CR0_PE | CR0_PG | CR0_ET | CR0_NE
        sregs.efer = EFER_LME | EFER_LMA
        return sregs

    def _check_cpu(self, cpu: int) -> None:
        if not 0 <= cpu < self.max_cpus:
            raise GuestLoadError(f"the guest runtime holds {self.max_cpus} vCPUs, not vCPU {cpu}")


def find_layout(image: "ElfImage") -> RuntimeLayout | None:
    """The image's checked ``rt_layout``; None if it has none (or another
    version), so it starts at its ELF entry. Raises GuestLoadError for a
    layout that claims version 1 but does not fit the image."""
    addr = image.symbols.get(SYMBOL)
    if addr is None:
        return None
    raw = image.read(addr, LAYOUT.size)
    if raw is None:
        return None
    f = dict(zip(FIELDS, LAYOUT.unpack(raw)))
    if f["magic"] != MAGIC or f["version"] != VERSION:
        return None
    return _checked(image, f)


def _checked(image: "ElfImage", f: dict[str, int]) -> RuntimeLayout:
    name = image.path

    def bad(what: str) -> GuestLoadError:
        return GuestLoadError(f"{name}: {SYMBOL}: {what}")

    def inside(what: str, start: int, size: int) -> None:
        if size <= 0 or start < image.start or start + size > image.end:
            raise bad(f"{what} [{start:#x}, +{size:#x}) is not inside the image "
                      f"[{image.start:#x}, {image.end:#x})")

    n = f["max_cpus"]
    if not 1 <= n <= 256:
        raise bad(f"max_cpus {n} is not 1 to 256")
    inside("GDT", f["gdt"], f["gdt_size"])
    if f["gdt_size"] % 8 or f["gdt_size"] > 0x10000:
        raise bad(f"GDT size {f['gdt_size']:#x} is not a whole number of descriptors "
                  f"up to 64 KiB")
    if (f["tss_index"] + 2 * n) * 8 > f["gdt_size"] or f["tss_index"] == 0:
        raise bad(f"the GDT has no room for {n} TSS descriptors from entry {f['tss_index']}")
    code = _descriptor(image, f, "user_code", bad)
    data = _descriptor(image, f, "user_data", bad)
    if not (code.present and code.dpl == 3 and code.s and code.type & 0x8 and code.l):
        raise bad(f"user_code {f['user_code']:#x} is not a present 64-bit DPL3 code segment")
    if not (data.present and data.dpl == 3 and data.s and not data.type & 0x8
            and data.type & 0x2):
        raise bad(f"user_data {f['user_data']:#x} is not a present writable DPL3 data segment")
    if f["idt_size"] % 16 or not 16 <= f["idt_size"] <= 4096:
        raise bad(f"IDT size {f['idt_size']:#x} is not 1 to 256 16-byte gates")
    inside("IDT", f["idt"], f["idt_size"])
    if not 0 <= f["ngates"] <= 256:
        raise bad(f"{f['ngates']} gates (at most 256)")
    table = image.read(f["gates"], GATE.size * f["ngates"]) if f["ngates"] else b""
    if table is None:
        raise bad(f"gate table at {f['gates']:#x} is not in the image's file data")
    gates = []
    for handler, vector, kind in GATE.iter_unpack(table):
        if 16 * vector >= f["idt_size"]:
            raise bad(f"gate for vector {vector} is past the IDT's end")
        if kind not in GATE_TYPES:
            raise bad(f"gate for vector {vector} has type {kind:#x}")
        inside(f"handler of vector {vector}", handler, 1)
        gates.append((vector, handler, kind))
    if f["tss_size"] < TSS_MIN or f["tss_size"] > 0x10000:
        raise bad(f"TSS size {f['tss_size']:#x} is not {TSS_MIN} bytes to 64 KiB")
    if not TSS_MIN <= f["iomap_offset"] or \
            f["iomap_offset"] + f["iomap_bytes"] + 1 > f["tss_size"]:
        raise bad(f"I/O map at {f['iomap_offset']:#x} (+{f['iomap_bytes']:#x} and its end "
                  f"byte) does not fit a {f['tss_size']:#x}-byte TSS")
    inside("TSSs", f["tss"], f["tss_size"] * n)
    if f["percpu_size"] < PERCPU.size:
        raise bad(f"per-vCPU block of {f['percpu_size']} bytes (at least {PERCPU.size})")
    inside("per-vCPU blocks", f["percpu"], f["percpu_size"] * n)
    if f["stack_size"] < 256 or f["stack_size"] % 16:
        raise bad(f"stack size {f['stack_size']:#x} (a multiple of 16, at least 256)")
    inside("kernel stacks", f["kstacks"], f["stack_size"] * (n + 1))
    inside("user stacks", f["ustacks"], f["stack_size"] * (n + 1))
    if f["pml4"] % 0x1000:
        raise bad(f"PML4 at {f['pml4']:#x} is not 4 KiB aligned")
    inside("PML4", f["pml4"], 0x1000)
    inside("user entry", f["user_entry"], 1)
    return RuntimeLayout(
        max_cpus=n, gdt=f["gdt"], gdt_size=f["gdt_size"], tss_index=f["tss_index"],
        user_code=f["user_code"], user_data=f["user_data"], idt=f["idt"],
        idt_size=f["idt_size"], gates=tuple(gates), tss=f["tss"], tss_size=f["tss_size"],
        iomap_offset=f["iomap_offset"], iomap_bytes=f["iomap_bytes"], percpu=f["percpu"],
        percpu_size=f["percpu_size"], kstacks=f["kstacks"], ustacks=f["ustacks"],
        stack_size=f["stack_size"], pml4=f["pml4"], user_entry=f["user_entry"],
        code_segment=code, data_segment=data)


def _descriptor(image: "ElfImage", f: dict[str, int], key: str, bad) -> Segment:
    selector = f[key]
    index = selector >> 3
    if selector > 0xFFFF or selector & 7 != 3 or index == 0 or 8 * index + 8 > f["gdt_size"]:
        raise bad(f"{key} {selector:#x} is not an RPL3 selector inside the GDT")
    raw = image.read(f["gdt"] + 8 * index, 8)
    if raw is None:
        raise bad(f"{key}'s descriptor is not in the image's file data")
    return segment_from_descriptor(selector, struct.unpack("<Q", raw)[0])
