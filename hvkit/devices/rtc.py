"""A minimal MC146818 CMOS RTC at ports 0x70/0x71: the time (BCD or binary,
12 or 24 hour as the guest selects in status B), status registers that say
the clock is valid and not updating, and the rest of the CMOS as memory."""
from __future__ import annotations

import time
from typing import Callable

SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR = 0, 2, 4, 6, 7, 8, 9
STATUS_A, STATUS_B, STATUS_C, STATUS_D = 0x0A, 0x0B, 0x0C, 0x0D
CENTURY = 0x32

B_24H = 0x02
B_BINARY = 0x04
B_SET = 0x80
D_VRT = 0x80


def _bcd(v: int) -> int:
    return ((v // 10) << 4) | (v % 10)


class CmosRtc:
    """``clock`` returns Unix seconds (host time by default)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.index = 0
        self.nmi_disabled = False
        self.ram = bytearray(128)
        self.ram[STATUS_A] = 0x26
        self.ram[STATUS_B] = B_24H
        self.ram[STATUS_D] = D_VRT
        self.offset = 0.0

    def state(self) -> dict:
        """Registers and the offset from host time the guest set (the
        clock itself follows the host, as a real RTC keeps running)."""
        return {"index": self.index, "nmi_disabled": self.nmi_disabled,
                "ram": self.ram.hex(), "offset": self.offset}

    def restore(self, state: dict) -> None:
        ram = bytes.fromhex(state["ram"])
        if len(ram) != len(self.ram):
            raise ValueError(f"CMOS RAM state is {len(ram)} bytes, not {len(self.ram)}")
        self.ram[:] = ram
        self.index = int(state["index"]) & 0x7F
        self.nmi_disabled = bool(state["nmi_disabled"])
        self.offset = float(state["offset"])

    def _time_field(self, reg: int) -> int:
        t = time.gmtime(self.clock() + self.offset)
        values = {SECONDS: t.tm_sec, MINUTES: t.tm_min, HOURS: t.tm_hour,
                  WEEKDAY: (t.tm_wday + 1) % 7 + 1, DAY: t.tm_mday, MONTH: t.tm_mon,
                  YEAR: t.tm_year % 100, CENTURY: t.tm_year // 100}
        v = values[reg]
        b = self.ram[STATUS_B]
        pm = 0
        if reg == HOURS and not b & B_24H:
            pm = 0x80 if v >= 12 else 0
            v = v % 12 or 12
        if not b & B_BINARY:
            v = _bcd(v)
        return v | pm

    def read(self, offset: int, size: int) -> bytes:
        if offset == 0:
            value = self.index
        else:
            reg = self.index
            if reg in (SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR, CENTURY):
                value = self._time_field(reg)
            elif reg == STATUS_C:
                value = self.ram[STATUS_C]
                self.ram[STATUS_C] = 0
            else:
                value = self.ram[reg]
        return bytes([value]) + b"\xff" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        value = data[0]
        if offset == 0:
            self.index = value & 0x7F
            self.nmi_disabled = bool(value & 0x80)
            return
        reg = self.index
        if reg in (STATUS_C, STATUS_D):
            return  # read-only
        if reg == STATUS_A:
            value &= 0x7F  # UIP is read-only
        self.ram[reg] = value
