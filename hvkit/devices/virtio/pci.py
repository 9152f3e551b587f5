"""virtio-pci, modern only (virtio 1.2, 4.1), on hvkit's PciDevice.

Vendor 0x1AF4, device 0x1040 + the virtio device id, revision 1. BAR 0
(64-bit memory) holds the four virtio structures, each announced by a
vendor-specific capability; BAR 2 holds the MSI-X table and PBA:

    BAR0 + 0x0000  common configuration
    BAR0 + 0x1000  ISR status (read clears; INTx follows it)
    BAR0 + 0x2000  device-specific configuration
    BAR0 + 0x3000  notifications: queue i at 0x3000 + 4 * i

A VIRTIO_PCI_CAP_PCI_CFG capability gives the alternative access window
the spec requires. Interrupts: MSI-X (a configuration vector and one per
queue, as the driver programs them) when MSI-X is enabled, else ISR + INTx.
``notify_regions()`` tells the machine where to register ioeventfds.
"""
from __future__ import annotations

import struct
import threading
from typing import Any

from hvkit.devices.irq import MsiSender
from hvkit.devices.pci.bar import BarKind
from hvkit.devices.pci.device import PciDevice
from hvkit.devices.pci.msix import MsixCapability
from hvkit.devices.virtio import spec as V
from hvkit.devices.virtio.device import VirtioDevice
from hvkit.devices.virtio.mmio import NotifyRegion

VENDOR_ID = 0x1AF4
DEVICE_ID_BASE = 0x1040
SUBSYSTEM_ID = 0x1100
REVISION = 1
CAP_ID_VENDOR = 0x09

CAP_COMMON_CFG = 1
CAP_NOTIFY_CFG = 2
CAP_ISR_CFG = 3
CAP_DEVICE_CFG = 4
CAP_PCI_CFG = 5

BAR = 0
MSIX_BAR = 2
BAR_SIZE = 0x4000
COMMON_OFFSET = 0x0000
COMMON_SIZE = 0x40
ISR_OFFSET = 0x1000
ISR_SIZE = 4
DEVICE_OFFSET = 0x2000
DEVICE_SIZE = 0x1000
NOTIFY_OFFSET = 0x3000
NOTIFY_MULTIPLIER = 4

# common configuration fields (struct virtio_pci_common_cfg)
DEVICE_FEATURE_SELECT = 0x00
DEVICE_FEATURE = 0x04
DRIVER_FEATURE_SELECT = 0x08
DRIVER_FEATURE = 0x0C
CONFIG_MSIX_VECTOR = 0x10
NUM_QUEUES = 0x12
DEVICE_STATUS = 0x14
CONFIG_GENERATION = 0x15
QUEUE_SELECT = 0x16
QUEUE_SIZE = 0x18
QUEUE_MSIX_VECTOR = 0x1A
QUEUE_ENABLE = 0x1C
QUEUE_NOTIFY_OFF = 0x1E
QUEUE_DESC = 0x20
QUEUE_DRIVER = 0x28
QUEUE_DEVICE = 0x30
QUEUE_NOTIFY_DATA = 0x38
QUEUE_RESET = 0x3A

_COMMON = struct.Struct("<IIIIHHBBHHHHHQQQHHHH")


class _Bar0:
    """The bus-facing view of BAR 0."""

    def __init__(self, transport: "VirtioPciTransport") -> None:
        self.transport = transport

    def read(self, offset: int, size: int) -> bytes:
        return self.transport.bar_read(offset, size)

    def write(self, offset: int, data: bytes) -> None:
        self.transport.bar_write(offset, data)


class VirtioPciTransport(PciDevice):
    """A virtio device as a PCI function (modern virtio-pci)."""

    def __init__(self, device: VirtioDevice, msi: MsiSender | None = None, *,
                 msix_vectors: int | None = None) -> None:
        super().__init__(VENDOR_ID, DEVICE_ID_BASE + device.device_id, device.pci_class,
                         revision=REVISION, subsystem_vendor_id=VENDOR_ID,
                         subsystem_id=SUBSYSTEM_ID, name=f"virtio-{device.name}")
        self.device = device
        nq = device.num_queues
        if NOTIFY_OFFSET + NOTIFY_MULTIPLIER * nq > BAR_SIZE:
            raise ValueError(f"virtio-pci: too many queues ({nq})")
        self._vlock = threading.RLock()
        self.isr = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.queue_select = 0
        self.config_vector = V.MSI_NO_VECTOR
        self.queue_vectors = [V.MSI_NO_VECTOR] * nq
        self.add_bar(BAR, BAR_SIZE, BarKind.MEM64, _Bar0(self), name="virtio")
        self._vendor_cap(CAP_COMMON_CFG, COMMON_OFFSET, COMMON_SIZE)
        self._vendor_cap(CAP_NOTIFY_CFG, NOTIFY_OFFSET, max(4, NOTIFY_MULTIPLIER * nq),
                         struct.pack("<I", NOTIFY_MULTIPLIER))
        self._vendor_cap(CAP_ISR_CFG, ISR_OFFSET, ISR_SIZE)
        self._vendor_cap(CAP_DEVICE_CFG, DEVICE_OFFSET, DEVICE_SIZE)
        self.pci_cfg_cap = self._vendor_cap(CAP_PCI_CFG, 0, 0, bytes(4))
        c = self.pci_cfg_cap
        self.config.set_wmask(c + 4, 0xFF, 1)
        self.config.set_wmask(c + 8, 0xFFFFFFFF, 4)
        self.config.set_wmask(c + 12, 0xFFFFFFFF, 4)
        self.config.set_wmask(c + 16, 0xFFFFFFFF, 4)
        self.msix = MsixCapability(self, msix_vectors or nq + 1, table_bar=MSIX_BAR, msi=msi)
        self.add_bar(MSIX_BAR, self.msix.bar_size_needed(), BarKind.MEM32,
                     self.msix.region(MSIX_BAR), name="virtio-msix")
        device.attach(self)

    def _vendor_cap(self, cfg_type: int, offset: int, length: int, extra: bytes = b"") -> int:
        cap_len = 16 + len(extra)
        body = struct.pack("<BBBBxxII", cap_len, cfg_type, BAR, 0, offset, length) + extra
        return self.add_capability(CAP_ID_VENDOR, body)

    # -- what the machine wires --------------------------------------------------

    def notify_regions(self) -> list[NotifyRegion]:
        """Queue i's notify address is BAR 0 + ``offset``; Linux writes the
        queue index there as a 16-bit value. ``fd`` is the device's eventfd."""
        return [NotifyRegion(i, NOTIFY_OFFSET + NOTIFY_MULTIPLIER * i, 2, None,
                             self.device.notify_fd(i), bar=BAR)
                for i in range(self.device.num_queues)]

    def notify_addresses(self) -> list[tuple[int, int, int]]:
        """(guest-physical address, width, eventfd) per queue where BAR 0 is
        decoded now; empty while it is not. Re-read after a BAR move."""
        base = self.bars[BAR].mapped_at
        if base is None:
            return []
        return [(base + r.offset, r.length, r.fd) for r in self.notify_regions()]

    def queue_vector(self, index: int) -> int:
        """The MSI-X vector the driver gave queue ``index`` (0xFFFF: none)."""
        return self.queue_vectors[index]

    # -- interrupts (called by the device, any thread) ---------------------------------

    def _msix_or_intx(self, vector: int, isr_bit: int) -> None:
        with self._vlock:
            if self.msix.enabled:
                if vector != V.MSI_NO_VECTOR:
                    self.msix.notify(vector)
                return
            self.isr |= isr_bit
            self.set_intx(True)

    def signal_queue(self, index: int) -> None:
        self._msix_or_intx(self.queue_vectors[index], V.INT_VRING)

    def signal_config(self) -> None:
        with self._vlock:
            if self.msix.enabled:
                self.isr |= V.INT_CONFIG
        self._msix_or_intx(self.config_vector, V.INT_CONFIG)

    def device_reset(self) -> None:
        with self._vlock:
            self.isr = 0
            self.set_intx(False)
            self.config_vector = V.MSI_NO_VECTOR
            self.queue_vectors = [V.MSI_NO_VECTOR] * self.device.num_queues
            self.queue_select = 0
            self.device_feature_select = 0
            self.driver_feature_select = 0

    def reset(self) -> None:
        """Function-level reset: the PCI state, MSI-X and the virtio device."""
        super().reset()
        self.msix.reset()
        self.device.reset()

    # -- snapshots -------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Configuration space, MSI-X, the transport's registers and the
        device's state."""
        with self.device.lock, self._vlock:
            pci = PciDevice.state(self)
            msix = self.msix.state()
            return {"config": pci["config"], "intx": pci["intx"],
                    "msix_table": msix["table"], "msix_pba": msix["pba"],
                    "isr": self.isr, "config_vector": self.config_vector,
                    "queue_vectors": list(self.queue_vectors),
                    "queue_select": self.queue_select,
                    "device_feature_select": self.device_feature_select,
                    "driver_feature_select": self.driver_feature_select,
                    "device": self.device.state()}

    def restore(self, state: dict[str, Any]) -> None:
        """Listeners hear the restored BAR addresses and MSI-X vectors."""
        nq = self.device.num_queues
        vectors = [int(v) for v in state["queue_vectors"]]
        if len(vectors) != nq:
            raise ValueError(f"virtio-pci: saved state has {len(vectors)} queues, not {nq}")
        with self.device.lock:
            self.device.restore(state["device"])
            with self._vlock:
                self.isr = int(state["isr"]) & 0xFF
                self.config_vector = self._vector(int(state["config_vector"]))
                self.queue_vectors = [self._vector(v) for v in vectors]
                self.queue_select = int(state["queue_select"])
                self.device_feature_select = int(state["device_feature_select"])
                self.driver_feature_select = int(state["driver_feature_select"])
                PciDevice.restore(self, {"config": state["config"], "intx": state["intx"]})
            self.msix.restore({"table": state["msix_table"], "pba": state["msix_pba"]})

    # -- BAR 0 -----------------------------------------------------------------------

    def _queue(self):
        if 0 <= self.queue_select < self.device.num_queues:
            return self.device.queues[self.queue_select]
        return None

    def _common(self) -> bytes:
        dev = self.device
        q = self._queue()
        if q is not None:
            qfields = (q.size, self.queue_vectors[q.index], int(q.ready), q.index,
                       q.desc_addr, q.driver_addr, q.device_addr)
        else:
            qfields = (0, V.MSI_NO_VECTOR, 0, 0, 0, 0, 0)
        return _COMMON.pack(self.device_feature_select,
                            dev.device_features_page(self.device_feature_select),
                            self.driver_feature_select,
                            dev.driver_features_page(self.driver_feature_select),
                            self.config_vector, dev.num_queues, dev.status,
                            dev.config_generation, self.queue_select, *qfields,
                            0, 0, 0, 0)

    def bar_read(self, offset: int, size: int) -> bytes:
        if size <= 0 or offset < 0:
            return bytes(max(size, 0))
        if COMMON_OFFSET <= offset < COMMON_OFFSET + COMMON_SIZE:
            with self.device.lock:
                data = self._common()[offset - COMMON_OFFSET:offset - COMMON_OFFSET + size]
            return data + bytes(size - len(data))
        if ISR_OFFSET <= offset < ISR_OFFSET + ISR_SIZE:
            with self._vlock:
                value = self.isr if offset == ISR_OFFSET else 0
                if offset == ISR_OFFSET:
                    self.isr = 0
                    self.set_intx(False)
            return bytes([value]) + bytes(size - 1)
        if DEVICE_OFFSET <= offset < DEVICE_OFFSET + DEVICE_SIZE:
            return self.device.read_config(offset - DEVICE_OFFSET, size)
        return bytes(size)

    def bar_write(self, offset: int, data: bytes) -> None:
        data = bytes(data)
        if not data or offset < 0:
            return
        if NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + NOTIFY_MULTIPLIER * self.device.num_queues:
            if (offset - NOTIFY_OFFSET) % NOTIFY_MULTIPLIER == 0:
                self.device.notify((offset - NOTIFY_OFFSET) // NOTIFY_MULTIPLIER)
            return
        if COMMON_OFFSET <= offset < COMMON_OFFSET + COMMON_SIZE:
            self._common_write(offset - COMMON_OFFSET, data)
        elif DEVICE_OFFSET <= offset < DEVICE_OFFSET + DEVICE_SIZE:
            self.device.write_config(offset - DEVICE_OFFSET, data)

    def _vector(self, value: int) -> int:
        return value if value < self.msix.vectors else V.MSI_NO_VECTOR

    def _common_write(self, offset: int, data: bytes) -> None:
        dev = self.device
        size = len(data)
        value = int.from_bytes(data, "little")
        if (offset, size) == (DEVICE_STATUS, 1):
            dev.set_status(value)
            return
        with dev.lock:
            q = self._queue()
            if (offset, size) == (DEVICE_FEATURE_SELECT, 4):
                self.device_feature_select = value
            elif (offset, size) == (DRIVER_FEATURE_SELECT, 4):
                self.driver_feature_select = value
            elif (offset, size) == (DRIVER_FEATURE, 4):
                dev.set_driver_features_page(self.driver_feature_select, value)
            elif (offset, size) == (CONFIG_MSIX_VECTOR, 2):
                self.config_vector = self._vector(value)
            elif (offset, size) == (QUEUE_SELECT, 2):
                self.queue_select = value
            elif q is None:
                return
            elif (offset, size) == (QUEUE_MSIX_VECTOR, 2):
                self.queue_vectors[q.index] = self._vector(value)
            elif (offset, size) == (QUEUE_ENABLE, 2):
                if value == 1:
                    dev.enable_queue(q.index)
            elif q.ready:
                return                      # the layout is fixed while the queue runs
            elif (offset, size) == (QUEUE_SIZE, 2):
                q.size = value
            else:
                for base, attr in ((QUEUE_DESC, "desc_addr"), (QUEUE_DRIVER, "driver_addr"),
                                   (QUEUE_DEVICE, "device_addr")):
                    if offset == base and size == 8:
                        setattr(q, attr, value)
                    elif offset in (base, base + 4) and size == 4:
                        cur = getattr(q, attr)
                        if offset == base:
                            cur = (cur & ~0xFFFFFFFF) | value
                        else:
                            cur = (cur & 0xFFFFFFFF) | (value << 32)
                        setattr(q, attr, cur)

    # -- the PCI configuration access window (VIRTIO_PCI_CAP_PCI_CFG) -------------------

    def _window(self) -> tuple[int, int, int] | None:
        c = self.pci_cfg_cap
        bar = self.config.get_u8(c + 4)
        off = self.config.get_u32(c + 8)
        length = self.config.get_u32(c + 12)
        if bar != BAR or length not in (1, 2, 4) or off % length or off + length > BAR_SIZE:
            return None
        return bar, off, length

    def config_read(self, offset: int, size: int) -> bytes:
        data = super().config_read(offset, size)
        lo = self.pci_cfg_cap + 16
        if offset < lo + 4 and offset + size > lo:
            win = self._window()
            if win is not None:
                _, off, length = win
                value = self.bar_read(off, length) + bytes(4 - length)
                buf = bytearray(data)
                for i in range(size):
                    pos = offset + i
                    if lo <= pos < lo + 4:
                        buf[i] = value[pos - lo]
                data = bytes(buf)
        return data

    def config_write(self, offset: int, data: bytes) -> None:
        super().config_write(offset, data)
        lo = self.pci_cfg_cap + 16
        if offset < lo + 4 and offset + len(data) > lo:
            win = self._window()
            if win is not None:
                _, off, length = win
                self.bar_write(off, bytes(self.config.data[lo:lo + length]))
