"""Typed irqchip/PIT state and the emulation-failure instruction bytes:
layouts that round-trip, and parsers that take any bytes."""
import struct

from hypothesis import given, strategies as st

from hvkit.kvm.exits import emulation_failure_bytes
from hvkit.kvm.irqchip import (CHIP_IOAPIC, CHIP_PIC_SLAVE, IRQCHIP_SIZE, PIT_STATE2_SIZE,
                               IoapicState, PicState, PitState, pack_irqchip, unpack_irqchip)

u8 = st.integers(0, 255)


@given(st.lists(u8, min_size=16, max_size=16))
def test_pic_round_trip(values):
    pic = PicState(*values)
    buf = pack_irqchip(CHIP_PIC_SLAVE, pic)
    assert len(buf) == IRQCHIP_SIZE and unpack_irqchip(bytes(buf)) == pic


@given(st.lists(st.integers(0, 2**64 - 1), min_size=24, max_size=24), st.integers(0, 2**32 - 1))
def test_ioapic_round_trip(table, irr):
    io = IoapicState(irr=irr, redirtbl=table)
    assert unpack_irqchip(bytes(pack_irqchip(CHIP_IOAPIC, io))) == io


@given(st.binary(min_size=PIT_STATE2_SIZE, max_size=PIT_STATE2_SIZE))
def test_pit_state_takes_any_bytes(raw):
    pit = PitState.unpack(raw)
    again = PitState.unpack(pit.pack())
    assert again == pit and len(pit.pack()) == PIT_STATE2_SIZE


def test_emulation_failure_bytes():
    raw = struct.pack("<IIQB15s", 1, 4, 1, 3, b"\x0f\x01\xca" + bytes(12))
    assert emulation_failure_bytes(1, 4, raw) == b"\x0f\x01\xca"
    assert emulation_failure_bytes(2, 4, raw) == b""                 # not EMULATION
    no_flag = struct.pack("<IIQB15s", 1, 4, 0, 3, bytes(15))
    assert emulation_failure_bytes(1, 4, no_flag) == b""


@given(st.integers(0, 8), st.integers(0, 20), st.binary(max_size=40))
def test_emulation_failure_bytes_are_bounded(sub, n, raw):
    out = emulation_failure_bytes(sub, n, raw)
    assert len(out) <= 15
