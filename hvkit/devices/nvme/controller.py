"""The NVMe controller as a PCI function.

BAR0 (64-bit, 16 KiB) holds the registers and the doorbell array; BAR4
holds the MSI-X table and PBA. The VMM keeps the control plane: registers,
the enable/disable/reset state machine, the admin queue and queue creation.
The I/O queues are served either here (``accelerator=None``: each doorbell
write is handled in Python, mode a) or by the accelerator process, which
reads the rings in shared guest memory (modes b and c; see accelerator.py).
"""
from __future__ import annotations

import logging
import mmap
import os
import struct
import threading
from typing import TYPE_CHECKING, Callable, Iterable, Protocol

from hvkit.devices.irq import MsiSender
from hvkit.devices.nvme import spec as S
from hvkit.devices.nvme.admin import ACL, AERL, ELPE, TEMPERATURE_K, AdminCommandSet
from hvkit.devices.nvme.command import Command
from hvkit.devices.nvme.engine import (CTRL_PAGE_SIZE, MAX_QID, QueueEngine,
                                       read_counters, read_queue_state)
from hvkit.devices.nvme.io import IoCommandSet
from hvkit.devices.nvme.namespace import Namespace
from hvkit.devices.pci import constants as PC
from hvkit.devices.pci.bar import BarKind
from hvkit.devices.pci.device import PciDevice
from hvkit.devices.pci.msix import MsixCapability
from hvkit.errors import ConfigError
from hvkit.memory.guest import GuestMemory
from hvkit.storage.backend import BlockBackend, StorageError

if TYPE_CHECKING:
    from hvkit.devices.nvme.accelerator import Accelerator

log = logging.getLogger(__name__)

BAR0_SIZE = 0x4000
MSIX_BAR = 4


class IoPlane(Protocol):
    """Where the I/O queues are served (in-process, or the accelerator)."""

    def create_cq(self, qid: int, gpa: int, size: int, vector: int, ien: bool) -> None: ...
    def create_sq(self, qid: int, gpa: int, size: int, cqid: int) -> None: ...
    def delete_sq(self, qid: int) -> None: ...
    def delete_cq(self, qid: int) -> None: ...
    def set_dbbuf(self, shadow: int, eventidx: int) -> None: ...
    def set_coalescing(self, threshold: int, disabled_vectors: list[int]) -> None: ...
    def reset(self) -> None: ...
    def kick(self, qid: int, cq: bool) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class LocalIoPlane:
    """Mode a: the VMM's own engine serves the I/O queues synchronously."""

    def __init__(self, engine: QueueEngine) -> None:
        self.engine = engine

    def create_cq(self, qid: int, gpa: int, size: int, vector: int, ien: bool) -> None:
        self.engine.create_cq(qid, gpa, size, vector, ien)

    def create_sq(self, qid: int, gpa: int, size: int, cqid: int) -> None:
        self.engine.create_sq(qid, gpa, size, cqid)

    def delete_sq(self, qid: int) -> None:
        self.engine.delete_sq(qid)

    def delete_cq(self, qid: int) -> None:
        self.engine.delete_cq(qid)

    def set_dbbuf(self, shadow: int, eventidx: int) -> None:
        self.engine.set_dbbuf(shadow, eventidx)

    def set_coalescing(self, threshold: int, disabled_vectors: list[int]) -> None:
        self.engine.coalesce_threshold = threshold
        self.engine.coalesce_disabled_vectors = set(disabled_vectors)

    def reset(self) -> None:
        for qid in [q for q in self.engine.sqs if q]:
            self.engine.delete_sq(qid)
        for qid in [q for q in self.engine.cqs if q]:
            self.engine.delete_cq(qid)
        self.engine.dbbuf = None
        self.set_coalescing(0, [])

    def kick(self, qid: int, cq: bool) -> None:
        e = self.engine
        if cq:
            c = e.cqs.get(qid)
            qids = sorted(c.sqs) if c is not None and c.blocked else []
        else:
            qids = [qid]
        if qids:
            e.process(qids)
        # no poller here: every shadow doorbell update must reach us by MMIO
        e.update_event_indexes()

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class NvmeController(PciDevice):
    """An NVMe 1.4 controller over guest memory and BlockBackends."""

    def __init__(self, mem: GuestMemory,
                 namespaces: Iterable[BlockBackend | Namespace], *,
                 msi: MsiSender | None = None, serial: str = "HVKIT0001",
                 model: str = "hvkit NVMe", firmware: str = "0.1",
                 max_io_queues: int = 16, max_queue_entries: int = 4096,
                 mdts: int = 5, vendor_id: int = PC.VENDOR_REDHAT,
                 device_id: int = PC.DEVICE_NVME) -> None:
        super().__init__(vendor_id, device_id, PC.CLASS_STORAGE_NVME,
                         subsystem_vendor_id=vendor_id, subsystem_id=device_id,
                         name="nvme")
        if not 1 <= max_io_queues <= min(MAX_QID, (BAR0_SIZE - S.DOORBELL_BASE) // 8 - 1):
            raise ConfigError(f"nvme: max_io_queues must be 1..{MAX_QID}, got {max_io_queues}")
        if not 2 <= max_queue_entries <= 65536:
            raise ConfigError("nvme: max_queue_entries must be 2..65536")
        if not 1 <= mdts <= 10:
            raise ConfigError("nvme: mdts must be 1..10 (2 page .. 4 MiB transfers)")
        self.mem = mem
        self.serial = serial
        self.model = model
        self.firmware = firmware
        self.max_io_queues = max_io_queues
        self.max_queue_entries = max_queue_entries
        self.mdts = mdts
        self.namespaces: dict[int, Namespace] = {}
        for i, ns in enumerate(namespaces, start=1):
            if not isinstance(ns, Namespace):
                ns = Namespace(i, ns)
            if ns.nsid in self.namespaces:
                raise ConfigError(f"nvme: namespace {ns.nsid} given twice")
            self.namespaces[ns.nsid] = ns
        self.nn = max(self.namespaces, default=0)

        self.add_bar(0, BAR0_SIZE, BarKind.MEM64, self, name="nvme-regs")
        self.msix = MsixCapability(self, max_io_queues + 1, table_bar=MSIX_BAR, msi=msi)
        self.add_bar(MSIX_BAR, self.msix.bar_size_needed(), BarKind.MEM32,
                     self.msix.region(MSIX_BAR), name="nvme-msix")
        self.msix.add_listener(lambda _i: self._intx_update())

        self._lock = threading.RLock()
        self.ctrl_page_fd = -1
        self._ctrl_map = mmap.mmap(-1, CTRL_PAGE_SIZE)
        self.ctrl_page = memoryview(self._ctrl_map)
        self.io = IoCommandSet(mem, self.namespaces, S.PAGE_SIZE << mdts)
        self.admin = AdminCommandSet(self)
        self.engine = QueueEngine(mem, self.ctrl_page, self._execute, self._raise)
        self.plane: IoPlane = LocalIoPlane(self.engine)
        self.accelerator: Accelerator | None = None
        self.io_cqs: dict[int, tuple[int, int, int, bool]] = {}   # qid -> gpa, size, iv, ien
        self.io_sqs: dict[int, tuple[int, int, int]] = {}          # qid -> gpa, size, cqid
        self.dbbuf: tuple[int, int] | None = None
        self._errors: list[bytes] = []
        self.error_count = 0
        self.cap = ((max_queue_entries - 1)
                    | 1 << 16                 # CQR: contiguous queues required
                    | 10 << 24                # TO: 5 s
                    | 1 << 37)                # CSS: NVM command set
        self.cc = 0
        self.csts = 0
        self.aqa = 0
        self.asq = 0
        self.acq = 0
        self.intms = 0
        self.last_enable_error = ""
        #: called with (shadow gpa, eventidx gpa) or None when the guest
        #: configures or resets the doorbell buffer: the machine (de)registers
        #: the I/O doorbell ioeventfds then (mode c)
        self.dbbuf_listeners: list[Callable[[tuple[int, int] | None], None]] = []

    # -- the accelerator ----------------------------------------------------

    def use_accelerator(self, *, poll_us: int = 200) -> "Accelerator":
        """Serve the I/O queues from a separate process from now on (modes b
        and c). Call before the guest enables the controller. ``poll_us`` is
        how long the process keeps polling the doorbells after its last
        command before it arms EventIdx and sleeps on the kick eventfd."""
        from hvkit.devices.nvme.accelerator import Accelerator
        with self._lock:
            if self.csts & S.CSTS_RDY:
                raise ConfigError("nvme: switch to the accelerator before the guest enables the controller")
            if self.ctrl_page_fd < 0:
                fd = os.memfd_create("hvkit-nvme-ctrl", os.MFD_CLOEXEC)
                os.ftruncate(fd, CTRL_PAGE_SIZE)
                self.ctrl_page.release()
                self._ctrl_map.close()
                self._ctrl_map = mmap.mmap(fd, CTRL_PAGE_SIZE)
                self.ctrl_page = memoryview(self._ctrl_map)
                self.ctrl_page_fd = fd
                self.engine.page = self.ctrl_page
            acc = Accelerator(self, poll_us=poll_us)
            acc.start()
            self.accelerator = acc
            self.plane = acc
            return acc

    # -- register file (BAR0) ------------------------------------------------

    @property
    def cc_iosqes(self) -> int:
        return (self.cc >> S.CC_IOSQES_SHIFT) & S.CC_IOSQES_MASK

    @property
    def cc_iocqes(self) -> int:
        return (self.cc >> S.CC_IOCQES_SHIFT) & S.CC_IOCQES_MASK

    def _regs(self) -> bytes:
        return struct.pack("<QIIIIIIIIQQ", self.cap, S.VERSION_1_4, self.intms, self.intms,
                           self.cc, 0, self.csts, 0, self.aqa, self.asq, self.acq)

    def read(self, offset: int, size: int) -> bytes:
        """BAR0 reads: registers; doorbells and reserved space read as 0."""
        with self._lock:
            if 0 <= offset and offset + size <= 0x38:
                return self._regs()[offset:offset + size]
            m = self.msix.read(0, offset, size)
            return m if m is not None else bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            try:
                if offset >= S.DOORBELL_BASE:
                    if len(data) == 4 and offset % 4 == 0:
                        self._doorbell(offset, struct.unpack("<I", data)[0])
                    return
                self._register_write(offset, data)
            except Exception:           # never let a guest write crash the VMM
                log.exception("nvme: register write at %#x failed", offset)

    def _register_write(self, offset: int, data: bytes) -> None:
        size = len(data)
        value = int.from_bytes(data, "little")
        if size == 4 and offset == S.REG_INTMS:
            self.intms |= value
            self._intx_update()
        elif size == 4 and offset == S.REG_INTMC:
            self.intms &= ~value
            self._intx_update()
        elif size == 4 and offset == S.REG_CC:
            self._write_cc(value)
        elif size == 4 and offset == S.REG_AQA:
            if not self.csts & S.CSTS_RDY:
                self.aqa = value & 0x0FFF_0FFF
        elif offset in (S.REG_ASQ, S.REG_ASQ + 4, S.REG_ACQ, S.REG_ACQ + 4) and size in (4, 8):
            if self.csts & S.CSTS_RDY:
                return
            reg = S.REG_ASQ if offset < S.REG_ACQ else S.REG_ACQ
            cur = self.asq if reg == S.REG_ASQ else self.acq
            shift = 8 * (offset - reg)
            mask = ((1 << (8 * size)) - 1) << shift
            new = ((cur & ~mask) | (value << shift)) & 0xFFFF_FFFF_FFFF_F000
            if reg == S.REG_ASQ:
                self.asq = new
            else:
                self.acq = new
        # NSSR (no subsystem reset support), CAP, VS, CSTS: read-only

    def _write_cc(self, value: int) -> None:
        old = self.cc
        self.cc = value & S.CC_WRITABLE
        if (old ^ self.cc) & S.CC_EN:
            if self.cc & S.CC_EN:
                self._enable()
            else:
                self._controller_reset()
        shn = (self.cc >> S.CC_SHN_SHIFT) & S.CC_SHN_MASK
        if shn and not (old >> S.CC_SHN_SHIFT) & S.CC_SHN_MASK:
            self._shutdown()
        elif not shn:
            self.csts &= ~(0x3 << S.CSTS_SHST_SHIFT)

    def _enable(self) -> None:
        why = ""
        asqs = (self.aqa & 0xFFF) + 1
        acqs = ((self.aqa >> 16) & 0xFFF) + 1
        css = (self.cc >> S.CC_CSS_SHIFT) & S.CC_CSS_MASK
        mps = (self.cc >> S.CC_MPS_SHIFT) & S.CC_MPS_MASK
        ams = (self.cc >> S.CC_AMS_SHIFT) & S.CC_AMS_MASK
        if css != 0:
            why = f"CC.CSS {css} is not the NVM command set"
        elif mps != 0:
            why = f"CC.MPS {mps}: only 4 KiB pages (CAP.MPSMIN = MPSMAX = 0)"
        elif ams != 0:
            why = "CC.AMS: only round robin arbitration"
        elif asqs < 2 or acqs < 2:
            why = "AQA: admin queues need at least 2 entries"
        elif not self.asq or not self.acq:
            why = "ASQ/ACQ not set"
        elif not self.mem.contains(self.asq, asqs * S.SQE_SIZE) or \
                not self.mem.contains(self.acq, acqs * S.CQE_SIZE):
            why = "admin queues are outside guest RAM"
        if why:
            # RDY stays 0; the host times out after CAP.TO, as with QEMU
            self.last_enable_error = why
            log.warning("nvme: enable refused: %s", why)
            return
        self.last_enable_error = ""
        self.ctrl_page[:4096] = bytes(4096)
        self.engine.create_cq(0, self.acq, acqs, 0, True)
        self.engine.create_sq(0, self.asq, asqs, 0)
        self.csts = (self.csts & ~S.CSTS_CFS) | S.CSTS_RDY

    def _controller_reset(self) -> None:
        """CC.EN 1 -> 0: delete every queue, features to defaults; the admin
        queue registers survive (NVMe 1.4 section 7.3.2)."""
        self.plane.reset()
        self.engine.reset()
        self.io_cqs.clear()
        self.io_sqs.clear()
        had_dbbuf = self.dbbuf is not None
        self.dbbuf = None
        self.admin.reset()
        self.ctrl_page[:4096] = bytes(4096)
        self.csts &= ~(S.CSTS_RDY | (0x3 << S.CSTS_SHST_SHIFT))
        self.set_intx(False)
        if had_dbbuf:
            for cb in list(self.dbbuf_listeners):
                cb(None)

    def _shutdown(self) -> None:
        try:
            self.plane.flush()
            for ns in self.namespaces.values():
                if not ns.read_only:
                    ns.backend.flush()
        except StorageError as exc:
            log.warning("nvme: flush at shutdown failed: %s", exc)
        self.csts = (self.csts & ~(0x3 << S.CSTS_SHST_SHIFT)) | S.SHST_COMPLETE << S.CSTS_SHST_SHIFT

    def reset(self) -> None:
        """Function-level reset (the machine's reset): everything to power-on."""
        with self._lock:
            self._controller_reset()
            self.cc = self.aqa = self.asq = self.acq = self.intms = self.csts = 0
            self.msix.reset()
            super().reset()

    # -- doorbells -----------------------------------------------------------

    def doorbell_address(self, qid: int, cq: bool) -> int | None:
        """Guest-physical address of a doorbell, or None while BAR0 is unmapped."""
        base = self.bars[0].mapped_at
        if base is None:
            return None
        return base + S.DOORBELL_BASE + 4 * (2 * qid + (1 if cq else 0))

    def _doorbell(self, offset: int, value: int) -> None:
        if not self.csts & S.CSTS_RDY:
            return                                   # disabled: doorbells are ignored
        index = (offset - S.DOORBELL_BASE) // 4
        qid, cq = index >> 1, bool(index & 1)
        size = self._queue_size(qid, cq)
        if size is None:
            self._doorbell_error(S.AER_INFO_INVALID_DB_REGISTER)
            return
        if value >= size:
            self._doorbell_error(S.AER_INFO_INVALID_DB_VALUE)
            return
        self.engine.mirror_set(qid, cq, value)
        if qid == 0:
            if cq:
                self.engine.refresh_cq(self.engine.cqs[0])
                if self.engine.cqs[0].blocked:
                    self.engine.process([0])
            else:
                self.engine.process([0])
            self._intx_update()
            return
        self.plane.kick(qid, cq)
        if cq:
            self._intx_update()

    def _queue_size(self, qid: int, cq: bool) -> int | None:
        if qid == 0:
            q = self.engine.cqs.get(0) if cq else self.engine.sqs.get(0)
            return q.size if q is not None else None
        if cq:
            rec = self.io_cqs.get(qid)
            return rec[1] if rec else None
        rec = self.io_sqs.get(qid)
        return rec[1] if rec else None

    def _doorbell_error(self, info: int) -> None:
        self.record_error(0xFFFF, 0xFFFF, S.INVALID_FIELD, 0)
        self.admin.queue_event(S.AER_TYPE_ERROR, info, S.LOG_ERROR)

    # -- command dispatch and interrupts ---------------------------------------

    def _execute(self, sqid: int, cmd: Command) -> tuple[int, int] | None:
        if sqid == 0:
            return self.admin.execute(cmd)
        return self.io.execute(cmd)

    def post_admin(self, cid: int, status: int, dw0: int) -> None:
        """Complete an admin command later (Asynchronous Event Requests)."""
        self.engine.post(0, 0, cid, status, dw0)
        self.engine.flush_interrupts()

    def _raise(self, vector: int) -> None:
        """An interrupt is owed on ``vector``: MSI-X if enabled, else INTx."""
        if self.msix.notify(vector):
            return
        self._intx_update()

    def service_irq(self, vector: int) -> None:
        """The accelerator signalled ``vector`` and no irqfd took it (INTx
        mode, or a masked MSI-X vector): deliver it the slow way."""
        with self._lock:
            self._raise(vector)

    def _intx_update(self) -> None:
        """INTx is level: asserted while any interrupt-enabled CQ holds
        entries the host has not consumed, unless INTMS bit 0 masks it."""
        if self.msix.enabled:
            self.set_intx(False)
            return
        level = False
        if not self.intms & 1 and self.csts & S.CSTS_RDY:
            for qid, ien in self._irq_cqs():
                if not ien:
                    continue
                head = self._cq_head(qid)
                tail = self._cq_tail(qid)
                if head is not None and tail is not None and head != tail:
                    level = True
                    break
        self.set_intx(level)

    def _irq_cqs(self) -> list[tuple[int, bool]]:
        out = [(0, True)] if 0 in self.engine.cqs else []
        out += [(q, rec[3]) for q, rec in self.io_cqs.items()]
        return out

    def _cq_head(self, qid: int) -> int | None:
        if self.dbbuf is not None and qid:
            try:
                return self.mem.read_u32(self.dbbuf[0] + 4 * (2 * qid + 1))
            except Exception:
                return None
        return self.engine.mirror_get(qid, True)

    def _cq_tail(self, qid: int) -> int | None:
        if self.accelerator is None or qid == 0:
            cq = self.engine.cqs.get(qid)
            return cq.tail if cq else None
        return read_queue_state(self.ctrl_page, qid)[1]

    # -- control plane used by the admin command set ----------------------------

    def add_io_cq(self, qid: int, gpa: int, size: int, iv: int, ien: bool) -> None:
        self.engine.mirror_set(qid, True, 0)
        self.plane.create_cq(qid, gpa, size, iv, ien)
        self.io_cqs[qid] = (gpa, size, iv, ien)

    def add_io_sq(self, qid: int, gpa: int, size: int, cqid: int) -> None:
        self.engine.mirror_set(qid, False, 0)
        self.plane.create_sq(qid, gpa, size, cqid)
        self.io_sqs[qid] = (gpa, size, cqid)

    def remove_io_sq(self, qid: int) -> None:
        self.plane.delete_sq(qid)
        del self.io_sqs[qid]

    def remove_io_cq(self, qid: int) -> None:
        self.plane.delete_cq(qid)
        del self.io_cqs[qid]

    def configure_dbbuf(self, shadow: int, eventidx: int) -> None:
        self.plane.set_dbbuf(shadow, eventidx)
        self.dbbuf = (shadow, eventidx)
        for cb in list(self.dbbuf_listeners):
            cb(self.dbbuf)

    def set_coalescing(self) -> None:
        thr = self.admin.features[S.FEAT_IRQ_COALESCING] & 0xFF
        disabled = [iv for iv, v in self.admin.irq_config.items() if v & (1 << 16)]
        self.plane.set_coalescing(thr, disabled)

    def ioeventfd_doorbells(self) -> list[tuple[int, int]]:
        """(guest address, 4) of every I/O queue doorbell: what the machine
        registers as ioeventfds (all on ``accelerator.kick_fd``) in mode c.
        Valid only while a doorbell buffer is configured: without one, an
        ioeventfd would drop the value the guest wrote."""
        base = self.bars[0].mapped_at
        if base is None:
            return []
        return [(base + S.DOORBELL_BASE + 4 * i, 4) for i in range(2, 2 * (self.max_io_queues + 1))]

    # -- identify and logs --------------------------------------------------------

    def identify_controller(self) -> bytes:
        out = bytearray(4096)
        vid = self.config.get_u16(PC.VENDOR_ID)
        struct.pack_into("<HH", out, 0, vid, vid)
        out[4:24] = self.serial.encode()[:20].ljust(20)
        out[24:64] = self.model.encode()[:40].ljust(40)
        out[64:72] = self.firmware.encode()[:8].ljust(8)
        out[72] = 6                                  # RAB
        out[77] = self.mdts
        struct.pack_into("<HI", out, 78, 1, S.VERSION_1_4)      # CNTLID, VER
        struct.pack_into("<I", out, 0x5C, 0)         # OAES
        out[0x6F] = 1                                # CNTRLTYPE: I/O controller
        struct.pack_into("<H", out, 0x100, S.OACS_DBBUF)
        out[0x102] = ACL
        out[0x103] = AERL
        out[0x104] = 0x02                            # FRMW: one slot, slot 1 read-only
        out[0x105] = 0x00                            # LPA
        out[0x106] = ELPE
        out[0x107] = 0                               # NPSS: one power state
        struct.pack_into("<HH", out, 0x10A, 343, 358)    # WCTEMP, CCTEMP (HMPRE at 0x110 stays 0)
        out[0x200] = S.SQES_LOG2 << 4 | S.SQES_LOG2   # SQES max/min
        out[0x201] = S.CQES_LOG2 << 4 | S.CQES_LOG2
        struct.pack_into("<HI", out, 0x202, 0, self.nn)           # MAXCMD, NN
        struct.pack_into("<H", out, 0x208, S.ONCS_DSM | S.ONCS_WRITE_ZEROES)
        out[0x20D] = 0x07                            # VWC present, broadcast flush OK
        struct.pack_into("<I", out, 0x218, 0)        # SGLS: none
        out[0x300:0x300 + 64] = f"nqn.2024-01.io.hvkit:nvme:{self.serial}".encode()[:64].ljust(64, b"\0")
        struct.pack_into("<HBBIIBBBBBB", out, 0x800, 2500, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)  # PSD0
        return bytes(out)

    def record_error(self, sqid: int, cid: int, status: int, nsid: int) -> None:
        self.error_count += 1
        entry = struct.pack("<QHHHHQIB", self.error_count, sqid, cid,
                            (status & 0x7FFF) << 1, 0xFFFF, 0, nsid, 0).ljust(S.ERROR_LOG_ENTRY_SIZE, b"\0")
        self._errors.insert(0, entry)
        del self._errors[ELPE + 1:]

    def error_log(self) -> bytes:
        return b"".join(self._errors).ljust((ELPE + 1) * S.ERROR_LOG_ENTRY_SIZE, b"\0")

    def io_counters(self) -> dict[str, int]:
        if self.accelerator is not None:
            return read_counters(self.ctrl_page)
        st = self.io.stats
        return {"bytes_read": st.bytes_read, "bytes_written": st.bytes_written,
                "read_commands": st.read_commands, "write_commands": st.write_commands,
                "media_errors": st.media_errors}

    def smart_log(self) -> bytes:
        c = self.io_counters()
        out = bytearray(S.SMART_LOG_SIZE)
        out[0] = 0                                   # critical warning
        struct.pack_into("<H", out, 1, TEMPERATURE_K)
        out[3] = 100                                 # available spare %
        out[4] = 10                                  # spare threshold %
        out[5] = 0                                   # percentage used
        units = lambda b: -(-b // 512_000)           # noqa: E731 (thousands of 512-byte units)
        for off, value in ((32, units(c["bytes_read"])), (48, units(c["bytes_written"])),
                           (64, c["read_commands"]), (80, c["write_commands"]),
                           (112, 1), (160, c["media_errors"]), (176, self.error_count)):
            out[off:off + 16] = value.to_bytes(16, "little")
        return bytes(out)

    # -- snapshots -------------------------------------------------------------

    def state(self) -> dict:
        """Registers, features and every queue with its positions (JSON-able):
        with the engine in this process and the vCPUs paused, nothing is in
        flight. A controller served by an accelerator process is not saved."""
        with self._lock:
            e = self.engine
            a = self.admin
            acc = self.accelerator
            if acc is not None:
                # its process stops; the next one (after resume, or in the
                # restored VM) takes the queues from the published positions
                acc.suspend()
                published = {str(q): list(p) for q, p in acc.positions().items()}
            return {
                "accelerated": published if acc is not None else None,
                "pci": PciDevice.state(self), "msix": self.msix.state(),
                "regs": [self.cc, self.csts, self.aqa, self.asq, self.acq, self.intms],
                "error_count": self.error_count,
                "features": {str(k): v for k, v in a.features.items()},
                "irq_config": {str(k): v for k, v in a.irq_config.items()},
                "queues_allocated": list(a.queues_allocated), "queues_set": a.queues_set,
                "io_cqs": {str(q): list(r) for q, r in self.io_cqs.items()},
                "io_sqs": {str(q): list(r) for q, r in self.io_sqs.items()},
                "cqs": [[c.qid, c.gpa, c.size, c.vector, c.ien, c.tail, c.phase, c.head,
                         c.pending_irq, c.blocked] for c in e.cqs.values()],
                "sqs": [[q.qid, q.gpa, q.size, q.cqid, q.head, q.tail] for q in e.sqs.values()],
                "dbbuf": list(self.dbbuf) if self.dbbuf else None,
                "coalesce": [e.coalesce_threshold, sorted(e.coalesce_disabled_vectors)],
                "doorbells": bytes(self.ctrl_page[:8 * (MAX_QID + 1)]).hex(),
            }

    def restore(self, state: dict) -> None:
        """Take back ``state()`` on a controller of the same shape."""
        with self._lock:
            PciDevice.restore(self, state["pci"])
            self.msix.restore(state["msix"])
            self.cc, self.csts, self.aqa, self.asq, self.acq, self.intms = \
                (int(v) for v in state["regs"])
            self.error_count = int(state["error_count"])
            a = self.admin
            a.features = {int(k): int(v) for k, v in state["features"].items()}
            a.irq_config = {int(k): int(v) for k, v in state["irq_config"].items()}
            a.queues_allocated = tuple(int(v) for v in state["queues_allocated"])
            a.queues_set = bool(state["queues_set"])
            self.io_cqs = {int(q): (int(r[0]), int(r[1]), int(r[2]), bool(r[3]))
                           for q, r in state["io_cqs"].items()}
            self.io_sqs = {int(q): (int(r[0]), int(r[1]), int(r[2]))
                           for q, r in state["io_sqs"].items()}
            e = self.engine
            e.reset()
            accelerated = state.get("accelerated")
            if (accelerated is None) != (self.accelerator is None):
                raise ValueError("the saved controller was served "
                                 + ("by an accelerator" if accelerated is not None
                                    else "in the VMM") + "; this one is not")
            for qid, gpa, size, vector, ien, tail, phase, head, pending, blocked in state["cqs"]:
                cq = e.create_cq(int(qid), int(gpa), int(size), int(vector), bool(ien),
                                 tail=int(tail), phase=int(phase))
                cq.head, cq.pending_irq, cq.blocked = int(head), int(pending), bool(blocked)
            for qid, gpa, size, cqid, head, tail in state["sqs"]:
                if int(cqid) not in e.cqs:
                    raise ValueError(f"saved SQ {qid} names a missing CQ {cqid}")
                sq = e.create_sq(int(qid), int(gpa), int(size), int(cqid), head=int(head))
                sq.tail = int(tail)
            doorbells = bytes.fromhex(state["doorbells"])
            self.ctrl_page[:len(doorbells)] = doorbells
            self.dbbuf = tuple(int(v) for v in state["dbbuf"]) if state["dbbuf"] else None
            if self.dbbuf is not None:
                e.set_dbbuf(*self.dbbuf, initialise=False)
            if self.accelerator is not None:
                self.accelerator.resume_queues({int(q): tuple(int(v) for v in p)
                                                for q, p in accelerated.items()})
                if self.dbbuf is not None:
                    for cb in list(self.dbbuf_listeners):
                        cb(self.dbbuf)
            else:
                threshold, disabled = state["coalesce"]
                self.plane.set_coalescing(int(threshold), [int(v) for v in disabled])

    def close(self) -> None:
        with self._lock:
            self.plane.close()
            self.ctrl_page.release()
            self._ctrl_map.close()
            if self.ctrl_page_fd >= 0:
                os.close(self.ctrl_page_fd)
                self.ctrl_page_fd = -1
