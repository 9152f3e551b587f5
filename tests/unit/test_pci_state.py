"""A PCI function's snapshot: configuration space, INTx and MSI-X come back,
and the machine hears the restored BAR addresses and vectors."""
from __future__ import annotations

import json
import struct

import pytest

from hvkit.devices.irq import RecordingLine, RecordingMsi
from hvkit.devices.pci import BarAllocator, BarKind, MsixCapability, PciDevice
from hvkit.devices.pci import constants as C
from hvkit.errors import ConfigError


class Region:
    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        pass


class Widget(PciDevice):
    def __init__(self, msi=None, vectors: int = 4) -> None:
        super().__init__(0x1234, 0x5678, 0x018000, name="widget")
        self.add_bar(0, 0x4000, BarKind.MEM64, Region())
        self.msix = MsixCapability(self, vectors, table_bar=2, msi=msi)
        self.add_bar(2, self.msix.bar_size_needed(), BarKind.MEM32, self.msix.region(2))


def entry(w: Widget, index: int, address: int, data: int, masked: bool) -> None:
    for i, v in enumerate((address, 0, data, int(masked))):
        w.msix.write_table(index * 16 + 4 * i, struct.pack("<I", v))


def program(w: Widget) -> None:
    BarAllocator().assign([w])
    ctrl = w.config.get_u16(w.msix.cap_offset + 2)
    w.config_write(w.msix.cap_offset + 2, struct.pack("<H", ctrl | 0x8000))
    entry(w, 1, 0xFEE0_0000, 0x45, masked=False)
    w.msix.notify(3)                     # masked vector: pending
    w.set_intx(True)


def test_function_state_round_trips_through_json():
    w = Widget(RecordingMsi())
    program(w)
    state = json.loads(json.dumps({"pci": w.state(), "msix": w.msix.state()}))

    msi, line = RecordingMsi(), RecordingLine()
    w2 = Widget(msi)
    w2.attach_intx(line, 16)
    moves, vectors = [], []
    w2.add_bar_listener(lambda i, old, new: moves.append((i, old, new)))
    w2.msix.add_listener(vectors.append)
    w2.restore(state["pci"])
    w2.msix.restore(state["msix"])

    assert bytes(w2.config.data) == bytes(w.config.data)
    assert (0, None, w.bars[0].mapped_at) in moves and w2.bars[2].mapped_at == w.bars[2].mapped_at
    assert line.level and w2.config.get_u16(C.STATUS) & C.STATUS_INTERRUPT
    assert w2.msix.enabled and w2.msix.vector(1) == w.msix.vector(1)
    assert w2.msix.vector(1).data == 0x45 and not w2.msix.vector(1).masked
    assert w2.msix.pending(3)
    assert set(vectors) == {0, 1, 2, 3, None}
    # the pending vector goes out once the restored guest unmasks it
    entry(w2, 3, 0xFEE0_0000, 0x46, masked=False)
    assert msi.messages == [(0xFEE0_0000, 0x46)]


def test_restore_refuses_state_of_another_shape():
    w = Widget()
    program(w)
    with pytest.raises(ConfigError):
        Widget(vectors=8).msix.restore(w.msix.state())
    bad = dict(w.state(), config="00" * 16)
    with pytest.raises(ConfigError):
        Widget().restore(bad)
