"""A PCI function: a type-0 configuration header, BARs, INTx and listeners.

Concrete devices (the host bridge, NVMe) subclass this. BAR sizing works
the way the guest expects through the write masks (write all ones, read
back ``~(size - 1) | flags``); when the decoded address of a BAR changes
(the guest moved it, or toggled memory/I/O decoding) the listeners hear
``(bar_index, old_address, new_address)`` with ``None`` for "not decoded",
so the machine can remap its MMIO bus and re-register ioeventfds.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

from hvkit.devices.bus import Device
from hvkit.devices.irq import IrqLine
from hvkit.devices.pci import constants as C
from hvkit.devices.pci.bar import Bar, BarKind
from hvkit.devices.pci.config import ConfigSpace
from hvkit.errors import ConfigError

BarListener = Callable[[int, "int | None", "int | None"], None]
ConfigHook = Callable[[int, bytes], None]


class PciDevice:
    """Base class of every PCI function hvkit models."""

    def __init__(self, vendor_id: int, device_id: int, class_code: int, *,
                 revision: int = 0, subsystem_vendor_id: int = 0,
                 subsystem_id: int = 0, interrupt_pin: int = 1,
                 config_size: int = C.CONFIG_SPACE_SIZE, name: str = "") -> None:
        self.name = name or type(self).__name__
        self.config = cfg = ConfigSpace(config_size)
        cfg.set_u16(C.VENDOR_ID, vendor_id)
        cfg.set_u16(C.DEVICE_ID, device_id)
        cfg.set_u8(C.REVISION_ID, revision)
        cfg.data[C.CLASS_CODE:C.CLASS_CODE + 3] = (class_code & 0xFFFFFF).to_bytes(3, "little")
        cfg.set_u8(C.HEADER_TYPE, C.HEADER_TYPE_NORMAL)
        cfg.set_u16(C.SUBSYSTEM_VENDOR_ID, subsystem_vendor_id)
        cfg.set_u16(C.SUBSYSTEM_ID, subsystem_id)
        cfg.set_u8(C.INTERRUPT_PIN, interrupt_pin)
        cfg.set_wmask(C.COMMAND, C.COMMAND_IO | C.COMMAND_MEMORY | C.COMMAND_MASTER
                      | C.COMMAND_PARITY | C.COMMAND_SERR | C.COMMAND_INTX_DISABLE, 2)
        cfg.set_w1cmask(C.STATUS, C.STATUS_W1C, 2)
        cfg.set_wmask(C.CACHE_LINE_SIZE, 0xFF, 1)
        cfg.set_wmask(C.LATENCY_TIMER, 0xFF, 1)
        cfg.set_wmask(C.INTERRUPT_LINE, 0xFF, 1)
        self.bars: list[Bar | None] = [None] * 6
        self._bar_listeners: list[BarListener] = []
        self._hooks: list[tuple[int, int, ConfigHook]] = []
        self._lock = threading.RLock()
        self.intx: IrqLine | None = None
        self._intx_level = False
        self._intx_out = False

    # -- set-up ------------------------------------------------------------

    def add_bar(self, index: int, size: int, kind: BarKind, region: Device, *,
                prefetchable: bool = False, name: str = "") -> Bar:
        """Declare BAR ``index`` of ``size`` bytes served by ``region``."""
        width = 2 if kind is BarKind.MEM64 else 1
        if not 0 <= index <= 6 - width:
            raise ConfigError(f"{self.name}: BAR index {index} out of range for {kind.value}")
        if any(self.bars[i] is not None for i in range(index, index + width)):
            raise ConfigError(f"{self.name}: BAR {index} already in use")
        if index > 0 and self.bars[index - 1] is not None and self.bars[index - 1].kind is BarKind.MEM64:
            raise ConfigError(f"{self.name}: BAR {index} is the upper half of BAR {index - 1}")
        minimum = 4 if kind is BarKind.IO else 16
        if size < minimum or size & (size - 1):
            raise ConfigError(f"{self.name}: BAR size {size:#x} must be a power of two >= {minimum}")
        if kind is BarKind.IO and size > 256:
            raise ConfigError(f"{self.name}: I/O BARs are at most 256 bytes")
        if kind is BarKind.MEM32 and size > 1 << 31:
            raise ConfigError(f"{self.name}: a 32-bit BAR cannot be {size:#x} bytes")
        bar = Bar(index, size, kind, region, prefetchable, name or f"bar{index}")
        self.bars[index] = bar
        off = C.BAR0 + 4 * index
        low_flags = 0x3 if kind is BarKind.IO else 0xF
        self.config.set_u32(off, bar.flags)
        self.config.set_wmask(off, ~(size - 1) & ~low_flags & 0xFFFFFFFF, 4)
        if kind is BarKind.MEM64:
            self.config.set_u32(off + 4, 0)
            self.config.set_wmask(off + 4, (~(size - 1) >> 32) & 0xFFFFFFFF, 4)
        return bar

    def add_capability(self, cap_id: int, body: bytes) -> int:
        return self.config.add_capability(cap_id, body)

    def add_config_hook(self, offset: int, length: int, hook: ConfigHook) -> None:
        """Call ``hook(offset, data)`` after a guest write overlapping the range."""
        self._hooks.append((offset, offset + length, hook))

    def add_bar_listener(self, listener: BarListener) -> None:
        self._bar_listeners.append(listener)

    def attach_intx(self, line: IrqLine, irq_number: int) -> None:
        """Wire INTx to an interrupt line; ``irq_number`` goes in Interrupt Line."""
        self.intx = line
        self.config.set_u8(C.INTERRUPT_LINE, irq_number)

    # -- BAR addresses -----------------------------------------------------

    def bar_address(self, index: int) -> int:
        bar = self.bars[index]
        if bar is None:
            raise ConfigError(f"{self.name}: no BAR {index}")
        off = C.BAR0 + 4 * index
        mask = 0x3 if bar.is_io else 0xF
        addr = self.config.get_u32(off) & ~mask
        if bar.kind is BarKind.MEM64:
            addr |= self.config.get_u32(off + 4) << 32
        return addr

    def set_bar_address(self, index: int, address: int) -> None:
        """Place BAR ``index`` (the machine's BarAllocator does this)."""
        bar = self.bars[index]
        if bar is None:
            raise ConfigError(f"{self.name}: no BAR {index}")
        if address % bar.size:
            raise ConfigError(f"{self.name}: BAR {index} address {address:#x} is not "
                              f"aligned to its size {bar.size:#x}")
        off = C.BAR0 + 4 * index
        with self._lock:
            self.config.set_u32(off, (address & 0xFFFFFFFF) | bar.flags)
            if bar.kind is BarKind.MEM64:
                self.config.set_u32(off + 4, address >> 32)
            self._update_mappings()

    def enable_decoding(self) -> None:
        cmd = self.config.get_u16(C.COMMAND)
        for bar in self.bars:
            if bar is not None:
                cmd |= C.COMMAND_IO if bar.is_io else C.COMMAND_MEMORY
        with self._lock:
            self.config.set_u16(C.COMMAND, cmd)
            self._update_mappings()

    @property
    def command(self) -> int:
        return self.config.get_u16(C.COMMAND)

    @property
    def bus_master(self) -> bool:
        return bool(self.command & C.COMMAND_MASTER)

    def _decoded_address(self, bar: Bar) -> int | None:
        cmd = self.command
        enabled = cmd & (C.COMMAND_IO if bar.is_io else C.COMMAND_MEMORY)
        if not enabled:
            return None
        addr = self.bar_address(bar.index)
        width = 64 if bar.kind is BarKind.MEM64 else 32
        sizing = (~(bar.size - 1)) & ((1 << width) - 1) & ~(0x3 if bar.is_io else 0xF)
        if addr == 0 or addr == sizing:
            return None
        if bar.is_io and addr + bar.size > 0x10000:
            return None
        return addr

    def _update_mappings(self) -> None:
        for bar in self.bars:
            if bar is None:
                continue
            new = self._decoded_address(bar)
            old = bar.mapped_at
            if new != old:
                bar.mapped_at = new
                for listener in list(self._bar_listeners):
                    listener(bar.index, old, new)

    # -- guest access --------------------------------------------------------

    def config_read(self, offset: int, size: int) -> bytes:
        with self._lock:
            return self.config.read(offset, size)

    def config_write(self, offset: int, data: bytes) -> None:
        with self._lock:
            before_cmd = self.command
            self.config.write(offset, data)
            end = offset + len(data)
            if offset < C.BAR0 + 24 and end > C.COMMAND:
                self._update_mappings()
            if (before_cmd ^ self.command) & C.COMMAND_INTX_DISABLE:
                self._drive_intx()
            for lo, hi, hook in self._hooks:
                if offset < hi and end > lo:
                    hook(offset, data)

    # -- INTx ----------------------------------------------------------------

    def set_intx(self, level: bool) -> None:
        """Assert or deassert this function's INTx pin (Interrupt Status
        follows the pin; the line follows unless Interrupt Disable is set)."""
        with self._lock:
            self._intx_level = bool(level)
            status = self.config.get_u16(C.STATUS)
            if level:
                status |= C.STATUS_INTERRUPT
            else:
                status &= ~C.STATUS_INTERRUPT
            self.config.set_u16(C.STATUS, status)
            self._drive_intx()

    def _drive_intx(self) -> None:
        out = self._intx_level and not self.command & C.COMMAND_INTX_DISABLE
        if out != self._intx_out:
            self._intx_out = out
            if self.intx is not None:
                self.intx.set_level(out)

    def reset(self) -> None:
        """Function-level state a reset clears: decoding and INTx."""
        with self._lock:
            self.config.set_u16(C.COMMAND, 0)
            self.set_intx(False)
            self._update_mappings()

    # -- snapshots -------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Configuration space and the INTx pin (JSON-able): what a snapshot
        keeps of the function itself; subclasses add their registers."""
        with self._lock:
            return {"config": bytes(self.config.data).hex(), "intx": self._intx_level}

    def restore(self, state: dict[str, Any]) -> None:
        """Take back ``state()``: BAR listeners hear the restored addresses
        and the INTx line follows the restored pin."""
        data = bytes.fromhex(state["config"])
        if len(data) != len(self.config.data):
            raise ConfigError(f"{self.name}: saved configuration space is {len(data)} bytes, "
                              f"not {len(self.config.data)}")
        with self._lock:
            self.config.data[:] = data
            self._update_mappings()
            # the restored pin is driven out whatever the line held before
            self._intx_level = bool(state["intx"])
            self._intx_out = self._intx_level and not self.command & C.COMMAND_INTX_DISABLE
            if self.intx is not None:
                self.intx.set_level(self._intx_out)

    def __repr__(self) -> str:
        vid = self.config.get_u16(C.VENDOR_ID)
        did = self.config.get_u16(C.DEVICE_ID)
        return f"<{self.name} {vid:04x}:{did:04x}>"
