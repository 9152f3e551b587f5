"""The i8042 keyboard controller, as far as a microVM needs it: the CPU
reset line (command 0xFE), which Linux uses with ``reboot=k`` to end the VM."""
from __future__ import annotations

from typing import Callable

CMD_READ_CONFIG = 0x20
CMD_WRITE_CONFIG = 0x60
CMD_RESET_CPU = 0xFE
CMD_SELF_TEST = 0xAA

STATUS_OUTPUT_FULL = 0x01
STATUS_SYSTEM = 0x04


class I8042:
    """Ports 0x60 (data, offset 0) and 0x64 (command/status, offset 4)."""

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self.on_reset = on_reset
        self.config = 0x00
        self.out: list[int] = []
        self.pending_write: int | None = None
        self.resets = 0

    def read(self, offset: int, size: int) -> bytes:
        if offset == 0:
            value = self.out.pop(0) if self.out else 0
        elif offset == 4:
            value = STATUS_SYSTEM | (STATUS_OUTPUT_FULL if self.out else 0)
        else:
            value = 0xFF
        return bytes([value]) + b"\xff" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        value = data[0]
        if offset == 4:
            if value == CMD_RESET_CPU:
                self.resets += 1
                self.on_reset()
            elif value == CMD_READ_CONFIG:
                self.out.append(self.config)
            elif value == CMD_WRITE_CONFIG:
                self.pending_write = value
            elif value == CMD_SELF_TEST:
                self.out.append(0x55)
        elif offset == 0 and self.pending_write == CMD_WRITE_CONFIG:
            self.config = value
            self.pending_write = None
