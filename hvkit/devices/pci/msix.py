"""MSI-X: the capability, the vector table and the pending-bit array.

The table and PBA live in a BAR (``read_table``/``write_table`` and
``read_pba`` serve offsets inside them; ``MsixCapability.region`` is a
ready-made BAR region when the BAR holds nothing else). A device calls
``notify(vector)``: the message goes out through the ``MsiSender`` unless the
vector or the function is masked, in which case the pending bit is set and
the message goes out on unmask, as the PCI spec requires. The machine reads
``vector(i)`` to program KVM GSI routes and hears every change through
``add_listener`` (index, or ``None`` when Enable/Function Mask changed).
"""
from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from hvkit.devices.irq import MsiSender
from hvkit.devices.pci import constants as C
from hvkit.errors import ConfigError

if TYPE_CHECKING:
    from hvkit.devices.pci.device import PciDevice

ENTRY_SIZE = 16
CTRL_ENABLE = 1 << 15
CTRL_FUNCTION_MASK = 1 << 14
VECTOR_MASKED = 1


@dataclass(frozen=True)
class MsixVector:
    """What a KVM MSI route needs: the message, and whether it may fire."""

    address: int
    data: int
    masked: bool


class MsixCapability:
    """MSI-X for one PCI function with ``vectors`` table entries."""

    def __init__(self, device: "PciDevice", vectors: int, *, table_bar: int,
                 table_offset: int = 0, pba_bar: int | None = None,
                 pba_offset: int | None = None, msi: MsiSender | None = None) -> None:
        if not 1 <= vectors <= 2048:
            raise ConfigError(f"MSI-X supports 1..2048 vectors, got {vectors}")
        if table_offset % 8:
            raise ConfigError("MSI-X table offset must be 8-byte aligned")
        self.device = device
        self.vectors = vectors
        self.table_bar = table_bar
        self.table_offset = table_offset
        self.pba_bar = table_bar if pba_bar is None else pba_bar
        if pba_offset is None:
            pba_offset = -(-(table_offset + vectors * ENTRY_SIZE) // 4096) * 4096 \
                if self.pba_bar == table_bar else 0
        if pba_offset % 8:
            raise ConfigError("MSI-X PBA offset must be 8-byte aligned")
        self.pba_offset = pba_offset
        self.msi = msi
        self._lock = threading.RLock()
        self.table = bytearray(vectors * ENTRY_SIZE)
        for i in range(vectors):   # every vector starts masked (PCI spec)
            self.table[i * ENTRY_SIZE + 12] = VECTOR_MASKED
        self.pba = bytearray(-(-vectors // 64) * 8)
        self._listeners: list[Callable[[int | None], None]] = []
        body = struct.pack("<HII", vectors - 1, table_offset | table_bar,
                           self.pba_offset | self.pba_bar)
        self.cap_offset = device.add_capability(C.CAP_ID_MSIX, body)
        device.config.set_wmask(self.cap_offset + 2, CTRL_ENABLE | CTRL_FUNCTION_MASK, 2)
        device.add_config_hook(self.cap_offset + 2, 2, self._control_written)
        self._control = 0

    # -- state ---------------------------------------------------------------

    @property
    def table_size(self) -> int:
        return self.vectors * ENTRY_SIZE

    @property
    def pba_size(self) -> int:
        return len(self.pba)

    @property
    def enabled(self) -> bool:
        return bool(self.device.config.get_u16(self.cap_offset + 2) & CTRL_ENABLE)

    @property
    def function_masked(self) -> bool:
        return bool(self.device.config.get_u16(self.cap_offset + 2) & CTRL_FUNCTION_MASK)

    def vector(self, index: int) -> MsixVector:
        lo, hi, data, ctrl = struct.unpack_from("<IIII", self.table, index * ENTRY_SIZE)
        masked = bool(ctrl & VECTOR_MASKED) or self.function_masked or not self.enabled
        return MsixVector((hi << 32) | lo, data, masked)

    def pending(self, index: int) -> bool:
        return bool(self.pba[index // 8] >> (index % 8) & 1)

    def add_listener(self, listener: Callable[[int | None], None]) -> None:
        self._listeners.append(listener)

    def _tell(self, index: int | None) -> None:
        for listener in list(self._listeners):
            listener(index)

    # -- delivery -------------------------------------------------------------

    def notify(self, index: int) -> bool:
        """Signal vector ``index``; returns False if MSI-X is disabled (the
        device should use INTx then). Out-of-range vectors are dropped."""
        with self._lock:
            if not self.enabled:
                return False
            if not 0 <= index < self.vectors:
                return True
            vec = self.vector(index)
            if vec.masked:
                self.pba[index // 8] |= 1 << (index % 8)
                return True
            self._send(vec)
            return True

    def _send(self, vec: MsixVector) -> None:
        if self.msi is not None:
            self.msi.signal_msi(vec.address, vec.data)

    def _deliver_pending(self) -> None:
        if not self.enabled or self.function_masked:
            return
        for i in range(self.vectors):
            if self.pending(i):
                vec = self.vector(i)
                if not vec.masked:
                    self.pba[i // 8] &= ~(1 << (i % 8))
                    self._send(vec)

    def _control_written(self, offset: int, data: bytes) -> None:
        with self._lock:
            ctrl = self.device.config.get_u16(self.cap_offset + 2)
            if ctrl != self._control:
                self._control = ctrl
                self._tell(None)
                self._deliver_pending()

    def reset(self) -> None:
        with self._lock:
            cfg = self.device.config
            cfg.set_u16(self.cap_offset + 2, cfg.get_u16(self.cap_offset + 2) & ~(CTRL_ENABLE | CTRL_FUNCTION_MASK))
            self._control = cfg.get_u16(self.cap_offset + 2)
            for i in range(self.vectors):
                self.table[i * ENTRY_SIZE:(i + 1) * ENTRY_SIZE] = struct.pack("<IIII", 0, 0, 0, VECTOR_MASKED)
            self.pba[:] = bytes(len(self.pba))
            self._tell(None)

    # -- snapshots -------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """The vector table and pending bits (Enable and Function Mask live
        in configuration space, which the device saves)."""
        with self._lock:
            return {"table": bytes(self.table).hex(), "pba": bytes(self.pba).hex()}

    def restore(self, state: dict[str, Any]) -> None:
        """Take back ``state()`` after the device's configuration space was
        restored; listeners hear every vector and the control word, so the
        machine reprograms its routes."""
        table = bytes.fromhex(state["table"])
        pba = bytes.fromhex(state["pba"])
        if len(table) != len(self.table) or len(pba) != len(self.pba):
            raise ConfigError(f"saved MSI-X state has {len(table) // ENTRY_SIZE} vectors, "
                              f"this function has {self.vectors}")
        with self._lock:
            self.table[:] = table
            self.pba[:] = pba
            self._control = self.device.config.get_u16(self.cap_offset + 2)
            for i in range(self.vectors):
                self._tell(i)
            self._tell(None)

    # -- BAR accesses -----------------------------------------------------------

    def read_table(self, offset: int, size: int) -> bytes:
        """``offset`` is relative to the table start."""
        with self._lock:
            if offset < 0 or offset + size > self.table_size:
                return b"\xff" * size
            return bytes(self.table[offset:offset + size])

    def write_table(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > self.table_size or len(data) not in (1, 2, 4, 8):
            return
        with self._lock:
            first = offset // ENTRY_SIZE
            last = (offset + len(data) - 1) // ENTRY_SIZE
            before = [self.vector(i) for i in range(first, last + 1)]
            for i, b in enumerate(data):
                pos = offset + i
                field = pos % ENTRY_SIZE
                if field == 0:
                    b &= 0xFC            # message address is dword aligned
                elif field == 12:
                    b &= VECTOR_MASKED   # only the mask bit is defined
                elif field > 12:
                    b = 0
                self.table[pos] = b
            for i, old in zip(range(first, last + 1), before):
                new = self.vector(i)
                if new != old:
                    self._tell(i)
                    if old.masked and not new.masked and self.pending(i):
                        self.pba[i // 8] &= ~(1 << (i % 8))
                        self._send(new)

    def read_pba(self, offset: int, size: int) -> bytes:
        with self._lock:
            if offset < 0 or offset + size > self.pba_size:
                return b"\xff" * size
            return bytes(self.pba[offset:offset + size])

    def read(self, bar: int, offset: int, size: int) -> bytes | None:
        """Serve an access to ``bar`` at ``offset`` if it hits the table or
        PBA; None otherwise (the device's own registers)."""
        if bar == self.table_bar and self.table_offset <= offset < self.table_offset + self.table_size:
            return self.read_table(offset - self.table_offset, size)
        if bar == self.pba_bar and self.pba_offset <= offset < self.pba_offset + self.pba_size:
            return self.read_pba(offset - self.pba_offset, size)
        return None

    def write(self, bar: int, offset: int, data: bytes) -> bool:
        """True if the write hit the table or PBA (PBA writes are ignored)."""
        if bar == self.table_bar and self.table_offset <= offset < self.table_offset + self.table_size:
            self.write_table(offset - self.table_offset, data)
            return True
        if bar == self.pba_bar and self.pba_offset <= offset < self.pba_offset + self.pba_size:
            return True
        return False

    def region(self, bar: int) -> "MsixBarRegion":
        """A bus device for a BAR that holds only MSI-X structures."""
        return MsixBarRegion(self, bar)

    def bar_size_needed(self) -> int:
        end = max(self.table_offset + self.table_size, self.pba_offset + self.pba_size)
        size = 4096
        while size < end:
            size <<= 1
        return size


class MsixBarRegion:
    """Bus device view of a BAR dedicated to MSI-X (unused space reads 0)."""

    def __init__(self, msix: MsixCapability, bar: int) -> None:
        self.msix = msix
        self.bar = bar

    def read(self, offset: int, size: int) -> bytes:
        data = self.msix.read(self.bar, offset, size)
        return bytes(size) if data is None else data

    def write(self, offset: int, data: bytes) -> None:
        self.msix.write(self.bar, offset, data)
