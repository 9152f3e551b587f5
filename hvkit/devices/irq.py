"""Interrupt triggers: how a device raises an interrupt without knowing KVM.

The machine hands a device a trigger bound to a KVM IRQ line or MSI route;
tests hand it a recorder and look at the list.
"""
from __future__ import annotations

from typing import Callable, Protocol


class IrqLine(Protocol):
    """A level-or-edge interrupt line (ISA IRQ, PCI INTx)."""

    def set_level(self, level: bool) -> None: ...

    def pulse(self) -> None: ...


class MsiSender(Protocol):
    """Sends a message-signalled interrupt (PCI MSI / MSI-X)."""

    def signal_msi(self, address: int, data: int) -> None: ...


class CallbackLine:
    """An IrqLine that calls ``fn(level)``; the machine binds it to KVM_IRQ_LINE."""

    def __init__(self, fn: Callable[[bool], None]) -> None:
        self._fn = fn
        self.level = False

    def set_level(self, level: bool) -> None:
        level = bool(level)
        if level != self.level:
            self.level = level
            self._fn(level)

    def pulse(self) -> None:
        self._fn(True)
        self._fn(False)
        self.level = False


class RecordingLine:
    """An IrqLine that records every change, for device tests."""

    def __init__(self) -> None:
        self.level = False
        self.events: list[bool] = []

    def set_level(self, level: bool) -> None:
        level = bool(level)
        if level != self.level:
            self.level = level
            self.events.append(level)

    def pulse(self) -> None:
        self.events.extend([True, False])
        self.level = False


class RecordingMsi:
    """An MsiSender that records (address, data) pairs, for device tests."""

    def __init__(self) -> None:
        self.messages: list[tuple[int, int]] = []

    def signal_msi(self, address: int, data: int) -> None:
        self.messages.append((address, data))
