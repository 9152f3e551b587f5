"""The exit port: a guest writes a code and the VM stops with it.

Served in C when the machine registers it natively; this Python model is
the same device for buses without the native loop (and for tests).
"""
from __future__ import annotations

from typing import Callable


class ExitPort:
    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self.on_exit = on_exit

    def attach_native(self, native_vm, base: int) -> bool:
        native_vm.add_exit_port(base, 4)
        return True

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        self.on_exit(int.from_bytes(data[:8], "little"))


class NullPorts:
    """Ports whose writes are ignored and reads return zeros (port 0x80,
    Linux's I/O delay); served in C so they cost no trip to Python."""

    def attach_native(self, native_vm, base: int, length: int = 1) -> bool:
        native_vm.add_null_ports(base, length)
        return True

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        pass


