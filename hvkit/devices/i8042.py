"""The i8042 keyboard controller, as far as a microVM needs it: the CPU
reset line (command 0xFE, or output-port bit 0 cleared), which Linux uses
with ``reboot=k`` to end the VM, and answers to the probe commands so that
Linux's driver does not spin on a missing reply (every poll is an exit)."""
from __future__ import annotations

from typing import Callable

CMD_READ_CONFIG = 0x20
CMD_WRITE_CONFIG = 0x60
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9
CMD_SELF_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_OUTPUT = 0xD0
CMD_WRITE_OUTPUT = 0xD1
CMD_WRITE_KBD_OUT = 0xD2
CMD_WRITE_AUX_OUT = 0xD3
CMD_RESET_CPU = 0xFE

STATUS_OUTPUT_FULL = 0x01
STATUS_SYSTEM = 0x04
STATUS_KEYLOCK = 0x10       # set: keyboard not inhibited
STATUS_AUX_DATA = 0x20

OUTPUT_RESET = 0x01         # output port bit 0: CPU reset line (active low)
CONFIG_AUX_DISABLED = 0x20

# Commands whose next data byte is an argument, not a keyboard byte.
_WITH_ARG = (CMD_WRITE_CONFIG, CMD_WRITE_OUTPUT, CMD_WRITE_KBD_OUT, CMD_WRITE_AUX_OUT)


class I8042:
    """Ports 0x60 (data, offset 0) and 0x64 (command/status, offset 4)."""

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self.on_reset = on_reset
        self.config = CONFIG_AUX_DISABLED
        self.output_port = OUTPUT_RESET
        self.out: list[tuple[int, bool]] = []    # (byte, from the AUX port)
        self.pending: int | None = None
        self.resets = 0

    def state(self) -> dict:
        return {"config": self.config, "output_port": self.output_port,
                "out": [[b, a] for b, a in self.out], "pending": self.pending}

    def restore(self, state: dict) -> None:
        self.config = int(state["config"]) & 0xFF
        self.output_port = int(state["output_port"]) & 0xFF
        self.out = [(int(b) & 0xFF, bool(a)) for b, a in state["out"]][:64]
        p = state.get("pending")
        self.pending = None if p is None else int(p) & 0xFF

    def _reply(self, value: int, aux: bool = False) -> None:
        self.out.append((value & 0xFF, aux))

    def read(self, offset: int, size: int) -> bytes:
        if offset == 0:
            value = self.out.pop(0)[0] if self.out else 0
        elif offset == 4:
            value = STATUS_SYSTEM | STATUS_KEYLOCK
            if self.out:
                value |= STATUS_OUTPUT_FULL | (STATUS_AUX_DATA if self.out[0][1] else 0)
        else:
            value = 0xFF
        return bytes([value]) + b"\xff" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        value = data[0]
        if offset == 4:
            self._command(value)
        elif offset == 0:
            cmd, self.pending = self.pending, None
            if cmd == CMD_WRITE_CONFIG:
                self.config = value
            elif cmd == CMD_WRITE_OUTPUT:
                self.output_port = value
                if not value & OUTPUT_RESET:
                    self._reset()
            elif cmd == CMD_WRITE_KBD_OUT:
                self._reply(value)
            elif cmd == CMD_WRITE_AUX_OUT:
                self._reply(value, aux=True)
            # A byte for the keyboard itself: there is none, so no answer.

    def _command(self, value: int) -> None:
        if value == CMD_RESET_CPU:
            self._reset()
        elif value == CMD_READ_CONFIG:
            self._reply(self.config)
        elif value == CMD_READ_OUTPUT:
            self._reply(self.output_port)
        elif value == CMD_SELF_TEST:
            self._reply(0x55)
        elif value in (CMD_KBD_TEST, CMD_AUX_TEST):
            self._reply(0x00)
        elif value == CMD_AUX_DISABLE:
            self.config |= CONFIG_AUX_DISABLED
        elif value == CMD_AUX_ENABLE:
            self.config &= ~CONFIG_AUX_DISABLED
        elif value in _WITH_ARG:
            self.pending = value

    def _reset(self) -> None:
        self.resets += 1
        self.on_reset()
