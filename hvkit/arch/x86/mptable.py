"""An Intel MultiProcessor Specification 1.4 table.

hvkit describes CPUs and interrupt wiring with an MP table rather than ACPI:
it is a few hundred bytes that Linux parses in a handful of instructions,
needs no AML, and covers what a microVM has (CPUs, one IOAPIC, ISA and PCI
interrupt lines). Firecracker makes the same choice.
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Iterable

from hvkit.arch.x86 import layout
from hvkit.arch.x86.e820 import EBDA_START
from hvkit.errors import ConfigError

if TYPE_CHECKING:
    from hvkit.memory.guest import GuestMemory

MPTABLE_ADDR = EBDA_START
APIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
CPU_ENABLED = 1
CPU_BSP = 2
INT_TYPE_INT = 0
INT_TYPE_NMI = 1
INT_TYPE_EXTINT = 3
# MP bus IDs. A PCI bus's ID is its PCI bus number: Linux looks a function's
# INTx up by (bus number, slot, pin) and refuses a bus whose MP type is not
# PCI. So the root PCI bus is ID 0 and ISA comes after it (as in SeaBIOS and
# kvmtool); without PCI interrupts ISA keeps ID 0.
BUS_PCI = 0
IOAPIC_PINS = 24
# PCI INTx: polarity active low (3), trigger level (3 << 2)
PCI_IRQ_FLAGS = 0x0F


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def build_mptable(ncpus: int, addr: int = MPTABLE_ADDR, *, cpu_signature: int = 0x600,
                  cpu_features: int = 0x201,
                  pci_irqs: Iterable[tuple[int, int, int]] = ()) -> bytes:
    """The floating pointer and configuration table, to be placed at
    ``addr``. ``pci_irqs`` lists (device, INTx pin 0-3, IOAPIC pin) of
    PCI bus 0; each becomes an interrupt entry whose source is bus 0 and
    IRQ ``device << 2 | pin``, level-triggered and active low."""
    if not 1 <= ncpus <= 254:
        raise ConfigError(f"an MP table describes 1 to 254 CPUs, not {ncpus}")
    ioapic_id = ncpus
    entries = []
    for cpu in range(ncpus):
        flags = CPU_ENABLED | (CPU_BSP if cpu == 0 else 0)
        entries.append(struct.pack("<BBBBII8x", 0, cpu, APIC_VERSION, flags,
                                   cpu_signature, cpu_features))
    pci = list(pci_irqs)
    isa = BUS_PCI + 1 if pci else 0
    if pci:
        entries.append(struct.pack("<BB6s", 1, BUS_PCI, b"PCI   "))
    entries.append(struct.pack("<BB6s", 1, isa, b"ISA   "))
    entries.append(struct.pack("<BBBBI", 2, ioapic_id, IOAPIC_VERSION, 1, layout.IOAPIC_ADDR))
    for irq in range(16):
        entries.append(struct.pack("<BBHBBBB", 3, INT_TYPE_INT, 0, isa, irq, ioapic_id, irq))
    for dev, pin, gsi in pci:
        if not (0 <= dev < 32 and 0 <= pin < 4 and 16 <= gsi < IOAPIC_PINS):
            raise ConfigError(f"PCI interrupt (device {dev}, pin {pin}, IOAPIC pin {gsi}) "
                              f"is out of range")
        entries.append(struct.pack("<BBHBBBB", 3, INT_TYPE_INT, PCI_IRQ_FLAGS, BUS_PCI,
                                   (dev << 2) | pin, ioapic_id, gsi))
    entries.append(struct.pack("<BBHBBBB", 4, INT_TYPE_EXTINT, 0, isa, 0, 0xFF, 0))
    entries.append(struct.pack("<BBHBBBB", 4, INT_TYPE_NMI, 0, isa, 0, 0xFF, 1))
    body = b"".join(entries)
    table_addr = addr + 16
    header = bytearray(struct.pack("<4sHBB8s12sIHHIHBB", b"PCMP", 44 + len(body), 4, 0,
                                   b"HVKIT   ", b"MICROVM     ", 0, 0, len(entries),
                                   layout.LAPIC_ADDR, 0, 0, 0))
    table = header + body
    table[7] = _checksum(table)
    fp = bytearray(struct.pack("<4sIBBB5x", b"_MP_", table_addr, 1, 4, 0))
    fp[10] = _checksum(fp)
    return bytes(fp) + bytes(table)


def write_mptable(memory: "GuestMemory", ncpus: int, **kwargs) -> int:
    data = build_mptable(ncpus, MPTABLE_ADDR, **kwargs)
    if MPTABLE_ADDR + len(data) > layout.HIMEM_START - 0x60000:  # must stay below 640 KiB
        raise ConfigError(f"MP table for {ncpus} CPUs does not fit below 640 KiB")
    memory.write(MPTABLE_ADDR, data)
    return MPTABLE_ADDR
