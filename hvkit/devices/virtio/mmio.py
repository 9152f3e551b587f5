"""virtio-mmio, version 2 (virtio 1.2, 4.2): a register window per device.

The machine maps ``VirtioMmioTransport`` on its MMIO bus (``SIZE`` bytes at
a base it chooses), wires ``irq`` to a guest interrupt line and tells Linux
where the device is with ``cmdline_token()`` (``virtio_mmio.device=``), as
Firecracker does. Queue notifications are writes of the queue index to
``QueueNotify``; ``notify_regions()`` lists them with the eventfd to
register as an ioeventfd (datamatch on the queue index).
"""
from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import Any

from hvkit.devices.irq import IrqLine
from hvkit.devices.virtio import spec as V
from hvkit.devices.virtio.device import VirtioDevice

MAGIC = 0x74726976          # "virt"
VERSION = 2
VENDOR_ID = 0x554D4551      # "QEMU", which Linux and Firecracker use too
#: the window every device gets (registers + 0xF00 bytes of device config)
SIZE = 0x1000

MAGIC_VALUE = 0x000
VERSION_REG = 0x004
DEVICE_ID = 0x008
VENDOR_ID_REG = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
SHM_SEL = 0x0AC
SHM_LEN_LOW = 0x0B0
SHM_LEN_HIGH = 0x0B4
SHM_BASE_LOW = 0x0B8
SHM_BASE_HIGH = 0x0BC
QUEUE_RESET = 0x0C0
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100


def cmdline_token(base: int, irq: int, size: int = SIZE) -> str:
    """The kernel command-line token that declares a virtio-mmio device."""
    if size % 1024 == 0:
        text = f"{size // 1024}K"
    else:
        text = str(size)
    return f"virtio_mmio.device={text}@{base:#x}:{irq}"


@dataclass(frozen=True)
class NotifyRegion:
    """Where a queue's notification lands: ``offset`` inside the window (or
    the BAR, on PCI), ``length`` bytes wide, optionally only when the value
    written equals ``datamatch``; ``fd`` is the eventfd to signal."""

    queue: int
    offset: int
    length: int
    datamatch: int | None
    fd: int
    bar: int | None = None


class VirtioMmioTransport:
    """A virtio device behind a virtio-mmio v2 register window."""

    def __init__(self, device: VirtioDevice, irq: IrqLine | None = None, *,
                 edge: bool = False) -> None:
        """``irq`` is held high while InterruptStatus is non-zero (a level
        interrupt); with ``edge=True`` every interrupt is a ``pulse()``
        instead, as an irqfd on an edge-triggered pin delivers it."""
        self.device = device
        self.irq = irq
        self.edge = edge
        self._lock = threading.RLock()
        self.interrupt_status = 0
        self.queue_sel = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        device.attach(self)

    # -- kernel command line ---------------------------------------------------

    @staticmethod
    def cmdline_token(base: int, irq: int) -> str:
        return cmdline_token(base, irq, SIZE)

    def notify_regions(self) -> list[NotifyRegion]:
        return [NotifyRegion(i, QUEUE_NOTIFY, 4, i, self.device.notify_fd(i))
                for i in range(self.device.num_queues)]

    def notify_addresses(self, base: int) -> list[tuple[int, int, int, int]]:
        """(guest-physical address, width, datamatch, eventfd) per queue for a
        window mapped at ``base``: one ioeventfd per queue, matched on the
        queue index written to QueueNotify."""
        return [(base + r.offset, r.length, r.datamatch, r.fd) for r in self.notify_regions()]

    # -- interrupts (called by the device, any thread) ---------------------------

    def _raise(self, bits: int) -> None:
        with self._lock:
            self.interrupt_status |= bits
            if self.irq is not None:
                if self.edge:
                    self.irq.pulse()
                else:
                    self.irq.set_level(True)

    def signal_queue(self, index: int) -> None:
        self._raise(V.INT_VRING)

    def signal_config(self) -> None:
        self._raise(V.INT_CONFIG)

    def device_reset(self) -> None:
        with self._lock:
            self.interrupt_status = 0
            if self.irq is not None and not self.edge:
                self.irq.set_level(False)

    # -- snapshots ----------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """The transport's registers and the device's state."""
        with self.device.lock, self._lock:
            return {"interrupt_status": self.interrupt_status, "queue_sel": self.queue_sel,
                    "device_features_sel": self.device_features_sel,
                    "driver_features_sel": self.driver_features_sel,
                    "device": self.device.state()}

    def restore(self, state: dict[str, Any]) -> None:
        with self.device.lock:
            self.device.restore(state["device"])
            with self._lock:
                self.queue_sel = int(state["queue_sel"])
                self.device_features_sel = int(state["device_features_sel"])
                self.driver_features_sel = int(state["driver_features_sel"])
                self.interrupt_status = int(state["interrupt_status"])
                if self.irq is not None and self.interrupt_status:
                    if self.edge:
                        self.irq.pulse()
                    else:
                        self.irq.set_level(True)

    # -- guest accesses -------------------------------------------------------------

    def _queue(self):
        if 0 <= self.queue_sel < self.device.num_queues:
            return self.device.queues[self.queue_sel]
        return None

    def read(self, offset: int, size: int) -> bytes:
        if offset >= CONFIG:
            return self.device.read_config(offset - CONFIG, size)
        if size != 4 or offset % 4:
            return bytes(size)
        return struct.pack("<I", self._read_reg(offset) & 0xFFFFFFFF)

    def _read_reg(self, offset: int) -> int:
        dev = self.device
        q = self._queue()
        if offset == MAGIC_VALUE:
            return MAGIC
        if offset == VERSION_REG:
            return VERSION
        if offset == DEVICE_ID:
            return dev.device_id
        if offset == VENDOR_ID_REG:
            return VENDOR_ID
        if offset == DEVICE_FEATURES:
            return dev.device_features_page(self.device_features_sel)
        if offset == QUEUE_NUM_MAX:
            return q.max_size if q is not None else 0
        if offset == QUEUE_READY:
            return int(q is not None and q.ready)
        if offset == INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == STATUS:
            return dev.status
        if offset in (SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH):
            return 0xFFFFFFFF               # no shared memory regions
        if offset == CONFIG_GENERATION:
            return dev.config_generation
        if q is not None:
            for reg, value in ((QUEUE_NUM, q.size), (QUEUE_DESC_LOW, q.desc_addr),
                               (QUEUE_DRIVER_LOW, q.driver_addr),
                               (QUEUE_DEVICE_LOW, q.device_addr)):
                if offset == reg:
                    return value & 0xFFFFFFFF
                if offset == reg + 4 and reg != QUEUE_NUM:
                    return value >> 32
        return 0

    def write(self, offset: int, data: bytes) -> None:
        if offset >= CONFIG:
            self.device.write_config(offset - CONFIG, bytes(data))
            return
        if len(data) != 4 or offset % 4:
            return
        value = struct.unpack("<I", data)[0]
        dev = self.device
        if offset == QUEUE_NOTIFY:
            dev.notify(value & 0xFFFF)
            return
        if offset == INTERRUPT_ACK:
            with self._lock:
                self.interrupt_status &= ~value
                if not self.interrupt_status and self.irq is not None and not self.edge:
                    self.irq.set_level(False)
            return
        if offset == STATUS:
            dev.set_status(value)
            return
        with dev.lock:
            if offset == DEVICE_FEATURES_SEL:
                self.device_features_sel = value
            elif offset == DRIVER_FEATURES:
                dev.set_driver_features_page(self.driver_features_sel, value)
            elif offset == DRIVER_FEATURES_SEL:
                self.driver_features_sel = value
            elif offset == QUEUE_SEL:
                self.queue_sel = value
            elif offset == SHM_SEL:
                pass
            else:
                self._write_queue_reg(offset, value)

    def _write_queue_reg(self, offset: int, value: int) -> None:
        q = self._queue()
        if q is None:
            return
        if offset == QUEUE_READY:
            if value & 1:
                self.device.enable_queue(q.index)
            return
        if q.ready:                         # the layout is fixed while the queue runs
            return
        if offset == QUEUE_NUM:
            q.size = value & 0xFFFF
        elif offset in (QUEUE_DESC_LOW, QUEUE_DESC_HIGH):
            q.desc_addr = _set_half(q.desc_addr, offset - QUEUE_DESC_LOW, value)
        elif offset in (QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH):
            q.driver_addr = _set_half(q.driver_addr, offset - QUEUE_DRIVER_LOW, value)
        elif offset in (QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH):
            q.device_addr = _set_half(q.device_addr, offset - QUEUE_DEVICE_LOW, value)


def _set_half(current: int, which: int, value: int) -> int:
    if which == 0:
        return (current & ~0xFFFFFFFF) | value
    return (current & 0xFFFFFFFF) | (value << 32)
