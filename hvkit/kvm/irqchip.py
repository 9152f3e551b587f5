"""Typed state of the in-kernel PIC, IOAPIC and PIT (KVM_GET/SET_IRQCHIP,
KVM_GET/SET_PIT2), so a VMM reads and edits them by field, not by offset.

Layouts from <asm/kvm.h>: kvm_irqchip is a u32 chip id, 4 bytes of padding
and a 512-byte union; kvm_pit_state2 is three 24-byte channels, flags and
36 reserved bytes.
"""
from __future__ import annotations

import struct
from dataclasses import astuple, dataclass, field
from typing import ClassVar

CHIP_PIC_MASTER = 0
CHIP_PIC_SLAVE = 1
CHIP_IOAPIC = 2
IRQCHIP_SIZE = 8 + 512
IOAPIC_PINS = 24
PIT_STATE2_SIZE = 112


@dataclass
class PicState:
    last_irr: int = 0
    irr: int = 0
    imr: int = 0
    isr: int = 0
    priority_add: int = 0
    irq_base: int = 0
    read_reg_select: int = 0
    poll: int = 0
    special_mask: int = 0
    init_state: int = 0
    auto_eoi: int = 0
    rotate_on_auto_eoi: int = 0
    special_fully_nested_mode: int = 0
    init4: int = 0
    elcr: int = 0
    elcr_mask: int = 0

    FMT: ClassVar[struct.Struct] = struct.Struct("<16B")

    def pack(self) -> bytes:
        return self.FMT.pack(*astuple(self))

    @classmethod
    def unpack(cls, data: bytes) -> "PicState":
        return cls(*cls.FMT.unpack_from(data))


@dataclass
class IoapicState:
    base_address: int = 0xFEC00000
    ioregsel: int = 0
    id: int = 0
    irr: int = 0
    redirtbl: list[int] = field(default_factory=lambda: [1 << 16] * IOAPIC_PINS)

    FMT: ClassVar[struct.Struct] = struct.Struct(f"<QIII4x{IOAPIC_PINS}Q")

    def pack(self) -> bytes:
        if len(self.redirtbl) != IOAPIC_PINS:
            raise ValueError(f"an IOAPIC has {IOAPIC_PINS} redirection entries, "
                             f"not {len(self.redirtbl)}")
        return self.FMT.pack(self.base_address, self.ioregsel, self.id, self.irr,
                             *self.redirtbl)

    @classmethod
    def unpack(cls, data: bytes) -> "IoapicState":
        v = cls.FMT.unpack_from(data)
        return cls(v[0], v[1], v[2], v[3], list(v[4:]))

    def vector(self, pin: int) -> int:
        return self.redirtbl[pin] & 0xFF

    def masked(self, pin: int) -> bool:
        return bool(self.redirtbl[pin] >> 16 & 1)


@dataclass
class PitChannel:
    count: int = 0
    latched_count: int = 0
    count_latched: int = 0
    status_latched: int = 0
    status: int = 0
    read_state: int = 0
    write_state: int = 0
    write_latch: int = 0
    rw_mode: int = 0
    mode: int = 0
    bcd: int = 0
    gate: int = 0
    count_load_time: int = 0

    FMT: ClassVar[struct.Struct] = struct.Struct("<IH10Bq")


@dataclass
class PitState:
    channels: list[PitChannel] = field(default_factory=lambda: [PitChannel() for _ in range(3)])
    flags: int = 0

    def pack(self) -> bytes:
        out = b"".join(PitChannel.FMT.pack(*astuple(c)) for c in self.channels)
        return out + struct.pack("<I36x", self.flags)

    @classmethod
    def unpack(cls, data: bytes) -> "PitState":
        if len(data) < PIT_STATE2_SIZE:
            raise ValueError(f"kvm_pit_state2 is {PIT_STATE2_SIZE} bytes, got {len(data)}")
        size = PitChannel.FMT.size
        chans = [PitChannel(*PitChannel.FMT.unpack_from(data, i * size)) for i in range(3)]
        return cls(chans, struct.unpack_from("<I", data, 3 * size)[0])


def pack_irqchip(chip_id: int, state: PicState | IoapicState) -> bytearray:
    buf = bytearray(IRQCHIP_SIZE)
    struct.pack_into("<I", buf, 0, chip_id)
    body = state.pack()
    buf[8:8 + len(body)] = body
    return buf


def unpack_irqchip(data: bytes) -> PicState | IoapicState:
    chip_id = struct.unpack_from("<I", data, 0)[0]
    if chip_id == CHIP_IOAPIC:
        return IoapicState.unpack(data[8:])
    if chip_id in (CHIP_PIC_MASTER, CHIP_PIC_SLAVE):
        return PicState.unpack(data[8:])
    raise ValueError(f"irqchip id {chip_id} is not a PIC (0, 1) or the IOAPIC (2)")


assert PitChannel.FMT.size == 24 and len(PitState().pack()) == PIT_STATE2_SIZE
assert IoapicState.FMT.size == 216 and PicState.FMT.size == 16
