"""PCI config space, BAR sizing and moves, capabilities, MSI-X and INTx."""
from __future__ import annotations

import struct

import pytest

from hvkit.devices.bus import Bus
from hvkit.devices.irq import RecordingLine, RecordingMsi
from hvkit.devices.pci import (BarAllocator, BarKind, MsixCapability, PciBus, PciConfigIo,
                               PciDevice, PciEcam, PciHostBridge)
from hvkit.devices.pci import constants as C
from hvkit.errors import ConfigError


class Scratch:
    """A BAR region that remembers writes."""

    def __init__(self, size: int) -> None:
        self.mem = bytearray(size)

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.mem[offset:offset + size])

    def write(self, offset: int, data: bytes) -> None:
        self.mem[offset:offset + len(data)] = data


class Widget(PciDevice):
    def __init__(self, msi=None) -> None:
        super().__init__(0x1234, 0x5678, 0x018000, revision=3, name="widget")
        self.add_bar(0, 0x4000, BarKind.MEM64, Scratch(0x4000))
        self.add_bar(2, 0x20, BarKind.IO, Scratch(0x20))
        self.msix = MsixCapability(self, 4, table_bar=4, msi=msi)
        self.add_bar(4, self.msix.bar_size_needed(), BarKind.MEM32, self.msix.region(4))


def cfg_addr(devfn: int, reg: int) -> bytes:
    return struct.pack("<I", 0x8000_0000 | devfn << 8 | reg)


@pytest.fixture
def machine():
    pci = PciBus()
    pci.add(PciHostBridge(), slot=0)
    msi = RecordingMsi()
    w = Widget(msi)
    devfn = pci.add(w)
    pio = Bus("pio")
    pio.register(C.CONFIG_IO_PORT_BASE, C.CONFIG_IO_PORT_LEN, PciConfigIo(pci))
    return pci, pio, w, devfn, msi


def cfg_read32(pio: Bus, devfn: int, reg: int) -> int:
    pio.write(0xCF8, cfg_addr(devfn, reg))
    return struct.unpack("<I", pio.read(0xCFC, 4))[0]


def cfg_write32(pio: Bus, devfn: int, reg: int, value: int) -> None:
    pio.write(0xCF8, cfg_addr(devfn, reg))
    pio.write(0xCFC, struct.pack("<I", value))


def test_scan_through_cf8(machine):
    pci, pio, w, devfn, _ = machine
    assert cfg_read32(pio, 0, 0) == C.DEVICE_HOST_BRIDGE << 16 | C.VENDOR_REDHAT
    assert cfg_read32(pio, 0, 8) >> 8 == C.CLASS_BRIDGE_HOST
    assert cfg_read32(pio, devfn, 0) == 0x5678_1234
    assert cfg_read32(pio, devfn, 8) == 0x018000 << 8 | 3
    assert cfg_read32(pio, 31 << 3, 0) == 0xFFFF_FFFF        # empty slot
    pio.write(0xCF8, struct.pack("<I", 1 << 8 | 0x02))          # enable bit clear
    assert pio.read(0xCFC, 4) == b"\xff" * 4
    # byte and word reads of the data port pick the right lanes
    pio.write(0xCF8, cfg_addr(devfn, 0))
    assert pio.read(0xCFE, 2) == struct.pack("<H", 0x5678)
    assert pio.read(0xCFD, 1) == b"\x12"


def test_read_only_fields_resist_writes(machine):
    _, pio, w, devfn, _ = machine
    cfg_write32(pio, devfn, 0, 0xDEAD_BEEF)
    assert cfg_read32(pio, devfn, 0) == 0x5678_1234
    cfg_write32(pio, devfn, 8, 0)
    assert cfg_read32(pio, devfn, 8) >> 8 == 0x018000


def test_bar_sizing_and_flags(machine):
    _, pio, w, devfn, _ = machine
    cfg_write32(pio, devfn, 0x10, 0xFFFF_FFFF)
    cfg_write32(pio, devfn, 0x14, 0xFFFF_FFFF)
    assert cfg_read32(pio, devfn, 0x10) == (~(0x4000 - 1) & 0xFFFF_FFF0) | C.BAR_MEM_TYPE_64
    assert cfg_read32(pio, devfn, 0x14) == 0xFFFF_FFFF
    cfg_write32(pio, devfn, 0x18, 0xFFFF_FFFF)
    assert cfg_read32(pio, devfn, 0x18) == (~(0x20 - 1) & 0xFFFF_FFFC) | C.BAR_IO
    cfg_write32(pio, devfn, 0x20, 0xFFFF_FFFF)
    assert w.bars[4].size == 0x2000      # table page + PBA page
    assert cfg_read32(pio, devfn, 0x20) == ~(0x2000 - 1) & 0xFFFF_FFF0
    for reg in (0x1C, 0x24, 0x30):      # unused BAR, BAR5, ROM: hard-wired zero
        cfg_write32(pio, devfn, reg, 0xFFFF_FFFF)
        assert cfg_read32(pio, devfn, reg) == 0


def test_allocator_places_and_listener_hears_moves(machine):
    pci, pio, w, devfn, _ = machine
    moves = []
    pci.add_bar_listener(lambda d, i, old, new: moves.append((d, i, old, new)))
    BarAllocator().assign(pci)
    placed = {i: w.bar_address(i) for i in (0, 2, 4)}
    assert placed[0] % 0x4000 == 0 and C.PCI_MMIO_BASE <= placed[0] < C.PCI_MMIO_END
    assert placed[4] % 0x1000 == 0 and placed[4] != placed[0]
    assert C.PCI_IO_BASE <= placed[2] < C.PCI_IO_END
    assert {(i, new) for d, i, old, new in moves if d is w} == set(placed.items())
    moves.clear()
    # the guest turns decoding off, moves BAR0, turns it back on
    cmd = cfg_read32(pio, devfn, 4) & 0xFFFF
    cfg_write32(pio, devfn, 4, cmd & ~C.COMMAND_MEMORY)
    assert (w, 0, placed[0], None) in moves and (w, 4, placed[4], None) in moves
    cfg_write32(pio, devfn, 0x10, 0xD000_0000)
    cfg_write32(pio, devfn, 0x14, 0x1)
    cfg_write32(pio, devfn, 4, cmd)
    assert (w, 0, None, 0x1_D000_0000) in moves
    assert w.bars[0].mapped_at == 0x1_D000_0000


def test_sizing_pattern_is_not_a_mapping(machine):
    pci, pio, w, devfn, _ = machine
    BarAllocator().assign(pci)
    cfg_write32(pio, devfn, 0x20, 0xFFFF_FFFF)    # sizing with decode still on
    assert w.bars[4].mapped_at is None
    cfg_write32(pio, devfn, 0x20, 0xC010_0000)
    assert w.bars[4].mapped_at == 0xC010_0000


def test_capability_list_walk(machine):
    _, pio, w, devfn, _ = machine
    status = cfg_read32(pio, devfn, 4) >> 16
    assert status & C.STATUS_CAP_LIST
    ptr = cfg_read32(pio, devfn, 0x34) & 0xFF
    header = cfg_read32(pio, devfn, ptr)
    assert header & 0xFF == C.CAP_ID_MSIX
    assert (header >> 16) & 0x7FF == 3                  # table size - 1
    assert cfg_read32(pio, devfn, ptr + 4) == 4         # table in BAR4 offset 0
    assert cfg_read32(pio, devfn, ptr + 8) == 0x1000 | 4
    assert w.config.capabilities() == [(C.CAP_ID_MSIX, ptr)]


def test_bad_bar_declarations():
    d = PciDevice(1, 2, 3)
    with pytest.raises(ConfigError):
        d.add_bar(0, 3000, BarKind.MEM32, Scratch(1))
    d.add_bar(0, 4096, BarKind.MEM64, Scratch(1))
    with pytest.raises(ConfigError):
        d.add_bar(1, 4096, BarKind.MEM32, Scratch(1))
    with pytest.raises(ConfigError):
        d.add_bar(5, 4096, BarKind.MEM64, Scratch(1))


def msix_entry(w, mmio: Bus, i: int, addr: int, data: int, masked: bool) -> None:
    base = w.bars[4].mapped_at + 16 * i
    mmio.write(base, struct.pack("<I", addr))
    mmio.write(base + 4, struct.pack("<I", 0))
    mmio.write(base + 8, struct.pack("<I", data))
    mmio.write(base + 12, struct.pack("<I", int(masked)))


def test_msix_delivery_masking_and_pba(machine):
    pci, pio, w, devfn, msi = machine
    BarAllocator().assign(pci)
    mmio = Bus("mmio")
    mmio.register(w.bars[4].mapped_at, w.bars[4].size, w.bars[4].region)
    changes = []
    w.msix.add_listener(changes.append)
    assert w.msix.notify(1) is False                     # disabled: caller uses INTx
    ptr = w.msix.cap_offset
    ctrl = cfg_read32(pio, devfn, ptr)
    cfg_write32(pio, devfn, ptr, ctrl | 0x8000_0000)      # enable
    assert w.msix.enabled and None in changes
    msix_entry(w, mmio, 1, 0xFEE0_0000, 0x41, masked=True)
    assert w.msix.vector(1).masked
    assert w.msix.notify(1) is True
    assert msi.messages == [] and w.msix.pending(1)
    pba = mmio.read(w.bars[4].mapped_at + 0x1000, 8)
    assert struct.unpack("<Q", pba)[0] == 0b10
    mmio.write(w.bars[4].mapped_at + 16 + 12, struct.pack("<I", 0))   # unmask
    assert msi.messages == [(0xFEE0_0000, 0x41)] and not w.msix.pending(1)
    assert 1 in changes and w.msix.vector(1).address == 0xFEE0_0000
    # function mask holds everything back until cleared
    cfg_write32(pio, devfn, ptr, ctrl | 0xC000_0000)
    w.msix.notify(1)
    assert len(msi.messages) == 1
    cfg_write32(pio, devfn, ptr, ctrl | 0x8000_0000)
    assert msi.messages[-1] == (0xFEE0_0000, 0x41) and len(msi.messages) == 2
    # out-of-range vectors and table accesses do nothing harmful
    assert w.msix.notify(99) is True
    mmio.write(w.bars[4].mapped_at + 0x800, b"\xff" * 4)
    assert mmio.read(w.bars[4].mapped_at + 0x1000 + 64, 4) == bytes(4)


def test_intx_follows_disable_bit(machine):
    _, pio, w, devfn, _ = machine
    line = RecordingLine()
    w.attach_intx(line, 11)
    assert cfg_read32(pio, devfn, 0x3C) & 0xFFFF == 0x010B        # pin A, line 11
    w.set_intx(True)
    assert line.level and cfg_read32(pio, devfn, 4) >> 16 & C.STATUS_INTERRUPT
    cmd = cfg_read32(pio, devfn, 4) & 0xFFFF
    cfg_write32(pio, devfn, 4, cmd | C.COMMAND_INTX_DISABLE)
    assert not line.level                                             # masked
    assert cfg_read32(pio, devfn, 4) >> 16 & C.STATUS_INTERRUPT        # still pending
    cfg_write32(pio, devfn, 4, cmd)
    assert line.level
    w.set_intx(False)
    assert not line.level and line.events == [True, False, True, False]


def test_status_error_bits_are_write_one_to_clear():
    d = PciDevice(1, 2, 3)
    d.config.set_u16(C.STATUS, 0x8000 | C.STATUS_CAP_LIST)
    d.config_write(C.STATUS, struct.pack("<H", 0x8000 | C.STATUS_CAP_LIST))
    assert d.config.get_u16(C.STATUS) == C.STATUS_CAP_LIST


def test_ecam_matches_cf8(machine):
    pci, pio, w, devfn, _ = machine
    ecam = PciEcam(pci)
    mmio = Bus("mmio")
    mmio.register(C.ECAM_BASE, ecam.length, ecam)
    assert mmio.read(C.ECAM_BASE + (devfn << 12), 4) == struct.pack("<I", 0x5678_1234)
    assert mmio.read(C.ECAM_BASE + (devfn << 12) + 0x100, 4) == b"\xff" * 4
    assert mmio.read(C.ECAM_BASE + (devfn << 12) + 1, 2) == b"\xff" * 2   # misaligned
    mmio.write(C.ECAM_BASE + (devfn << 12) + 0x3C, b"\x05")
    assert w.config.get_u8(C.INTERRUPT_LINE) == 5


def test_duplicate_slot_refused():
    pci = PciBus()
    pci.add(PciHostBridge(), slot=0)
    with pytest.raises(ConfigError):
        pci.add(PciHostBridge(), slot=0)
