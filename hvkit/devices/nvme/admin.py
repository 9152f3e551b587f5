"""Admin command set: runs in the VMM, which keeps the control plane.

Queue creation and deletion, features, logs and Doorbell Buffer Config
change controller state, so they stay here whether the I/O queues are
served in-process or by the accelerator process.
"""
from __future__ import annotations

import collections
import logging
import struct
from typing import TYPE_CHECKING

from hvkit.devices.nvme import spec as S
from hvkit.devices.nvme.command import Command
from hvkit.devices.nvme.prp import PrpError, map_prps
from hvkit.errors import GuestMemoryError

if TYPE_CHECKING:
    from hvkit.devices.nvme.controller import NvmeController

log = logging.getLogger(__name__)

AERL = 3                 # 0-based: four outstanding Asynchronous Event Requests
ACL = 3                  # 0-based abort command limit
ELPE = 15                # 0-based error log entries
TEMPERATURE_K = 310

FEATURE_DEFAULTS = {
    S.FEAT_ARBITRATION: 0,
    S.FEAT_POWER_MGMT: 0,
    S.FEAT_TEMP_THRESHOLD: 343,        # 70 C over-temperature threshold
    S.FEAT_ERROR_RECOVERY: 0,
    S.FEAT_VOLATILE_WC: 1,
    S.FEAT_IRQ_COALESCING: 0,
    S.FEAT_WRITE_ATOMICITY: 0,
    S.FEAT_ASYNC_EVENT_CONFIG: 0,
}


class AdminCommandSet:
    def __init__(self, ctrl: "NvmeController") -> None:
        self.ctrl = ctrl
        self.reset()

    def reset(self) -> None:
        """Controller reset: features to defaults, pending AERs dropped."""
        c = self.ctrl
        self.features = dict(FEATURE_DEFAULTS)
        self.irq_config: dict[int, int] = {}
        self.queues_allocated = (c.max_io_queues - 1, c.max_io_queues - 1)
        self.queues_set = False
        self.aer_cids: list[int] = []
        self.aer_events: collections.deque[tuple[int, int, int]] = collections.deque()
        self.aer_masked: set[int] = set()

    # -- plumbing --------------------------------------------------------------

    def execute(self, cmd: Command) -> tuple[int, int] | None:
        try:
            if cmd.fuse or cmd.psdt:
                return self._error(cmd, S.INVALID_FIELD)
            handler = self._HANDLERS.get(cmd.opcode)
            if handler is None:
                return self._error(cmd, S.INVALID_OPCODE)
            result = handler(self, cmd)
            if result is not None and result[0]:
                self._log_error(cmd, result[0])
            return result
        except PrpError as exc:
            return self._error(cmd, exc.status)
        except GuestMemoryError:
            return self._error(cmd, S.DATA_TRANSFER_ERROR)
        except Exception:
            log.exception("NVMe admin command %r failed", cmd)
            return self._error(cmd, S.INTERNAL_ERROR)

    def _error(self, cmd: Command, status: int) -> tuple[int, int]:
        self._log_error(cmd, status)
        return status, 0

    def _log_error(self, cmd: Command, status: int) -> None:
        self.ctrl.record_error(0, cmd.cid, status, cmd.nsid)

    def _to_guest(self, cmd: Command, data: bytes) -> None:
        mem = self.ctrl.mem
        pos = 0
        for gpa, n in map_prps(mem, cmd.prp1, cmd.prp2, len(data)):
            mem.write(gpa, data[pos:pos + n])
            pos += n

    def _from_guest(self, cmd: Command, length: int) -> bytes:
        mem = self.ctrl.mem
        return b"".join(mem.read(gpa, n) for gpa, n in map_prps(mem, cmd.prp1, cmd.prp2, length))

    # -- Identify ------------------------------------------------------------------

    def identify(self, cmd: Command) -> tuple[int, int]:
        c = self.ctrl
        cns = cmd.cdw10 & 0xFF
        if cns == S.CNS_CONTROLLER:
            data = c.identify_controller()
        elif cns == S.CNS_NAMESPACE:
            if cmd.nsid == 0 or (cmd.nsid > c.nn and cmd.nsid != 0xFFFF_FFFF):
                return S.INVALID_NAMESPACE, 0
            ns = c.namespaces.get(cmd.nsid)
            data = ns.identify(c.serial) if ns else bytes(4096)   # inactive: zeros
        elif cns == S.CNS_ACTIVE_NS_LIST:
            if cmd.nsid >= 0xFFFF_FFFE:
                return S.INVALID_NAMESPACE, 0
            ids = sorted(n for n in c.namespaces if n > cmd.nsid)[:1024]
            data = struct.pack(f"<{len(ids)}I", *ids).ljust(4096, b"\0")
        elif cns == S.CNS_NS_DESCRIPTORS:
            ns = c.namespaces.get(cmd.nsid)
            if ns is None:
                return S.INVALID_NAMESPACE, 0
            data = ns.descriptors(c.serial)
        else:
            return S.INVALID_FIELD, 0
        self._to_guest(cmd, data)
        return S.SUCCESS, 0

    # -- queues ------------------------------------------------------------------

    def create_cq(self, cmd: Command) -> tuple[int, int]:
        c = self.ctrl
        qid = cmd.cdw10 & 0xFFFF
        qsize = (cmd.cdw10 >> 16) + 1
        pc = cmd.cdw11 & 1
        ien = bool(cmd.cdw11 & 2)
        iv = cmd.cdw11 >> 16
        if qid == 0 or qid > self.queues_allocated[1] + 1 or qid in c.io_cqs:
            return S.INVALID_QUEUE_ID, 0
        if qsize < 2 or qsize > c.max_queue_entries:
            return S.INVALID_QUEUE_SIZE, 0
        if not pc:
            return S.INVALID_FIELD, 0                 # CAP.CQR: contiguous only
        if iv >= c.msix.vectors or (not c.msix.enabled and iv != 0):
            return S.INVALID_INTERRUPT_VECTOR, 0
        if cmd.prp1 == 0 or cmd.prp1 & (S.PAGE_SIZE - 1):
            return S.PRP_OFFSET_INVALID if cmd.prp1 else S.INVALID_FIELD, 0
        if c.cc_iocqes != S.CQES_LOG2:
            return S.INVALID_FIELD, 0
        if not c.mem.contains(cmd.prp1, qsize * S.CQE_SIZE):
            return S.INVALID_FIELD, 0
        c.add_io_cq(qid, cmd.prp1, qsize, iv, ien)
        return S.SUCCESS, 0

    def create_sq(self, cmd: Command) -> tuple[int, int]:
        c = self.ctrl
        qid = cmd.cdw10 & 0xFFFF
        qsize = (cmd.cdw10 >> 16) + 1
        pc = cmd.cdw11 & 1
        cqid = cmd.cdw11 >> 16
        if qid == 0 or qid > self.queues_allocated[0] + 1 or qid in c.io_sqs:
            return S.INVALID_QUEUE_ID, 0
        if cqid == 0 or cqid not in c.io_cqs:
            return S.CQ_INVALID, 0
        if qsize < 2 or qsize > c.max_queue_entries:
            return S.INVALID_QUEUE_SIZE, 0
        if not pc:
            return S.INVALID_FIELD, 0
        if cmd.prp1 == 0 or cmd.prp1 & (S.PAGE_SIZE - 1):
            return S.PRP_OFFSET_INVALID if cmd.prp1 else S.INVALID_FIELD, 0
        if c.cc_iosqes != S.SQES_LOG2:
            return S.INVALID_FIELD, 0
        if not c.mem.contains(cmd.prp1, qsize * S.SQE_SIZE):
            return S.INVALID_FIELD, 0
        c.add_io_sq(qid, cmd.prp1, qsize, cqid)
        return S.SUCCESS, 0

    def delete_sq(self, cmd: Command) -> tuple[int, int]:
        qid = cmd.cdw10 & 0xFFFF
        if qid == 0 or qid not in self.ctrl.io_sqs:
            return S.INVALID_QUEUE_ID, 0
        self.ctrl.remove_io_sq(qid)
        return S.SUCCESS, 0

    def delete_cq(self, cmd: Command) -> tuple[int, int]:
        qid = cmd.cdw10 & 0xFFFF
        c = self.ctrl
        if qid == 0 or qid not in c.io_cqs:
            return S.INVALID_QUEUE_ID, 0
        if any(sq[2] == qid for sq in c.io_sqs.values()):
            return S.INVALID_QUEUE_DELETION, 0
        c.remove_io_cq(qid)
        return S.SUCCESS, 0

    # -- features -----------------------------------------------------------------

    def _feature_value(self, fid: int, cdw11: int, sel: int) -> int | None:
        if fid == S.FEAT_NUM_QUEUES:
            if sel in (1, 2):
                m = self.ctrl.max_io_queues - 1
                return m | m << 16
            nsq, ncq = self.queues_allocated
            return nsq | ncq << 16
        if fid == S.FEAT_IRQ_CONFIG:
            iv = cdw11 & 0xFFFF
            if iv >= self.ctrl.msix.vectors:
                return None
            return self.irq_config.get(iv, iv) if sel == 0 else iv
        if fid in FEATURE_DEFAULTS:
            return self.features[fid] if sel == 0 else FEATURE_DEFAULTS[fid]
        return None

    def get_features(self, cmd: Command) -> tuple[int, int]:
        fid = cmd.cdw10 & 0xFF
        sel = (cmd.cdw10 >> 8) & 0x7
        if sel > 3:
            return S.INVALID_FIELD, 0
        value = self._feature_value(fid, cmd.cdw11, 0 if sel == 3 else sel)
        if value is None:
            return S.INVALID_FIELD, 0
        if sel == 3:
            return S.SUCCESS, 0b100                # changeable, not saveable, not per-NS
        return S.SUCCESS, value

    def set_features(self, cmd: Command) -> tuple[int, int]:
        c = self.ctrl
        fid = cmd.cdw10 & 0xFF
        if cmd.cdw10 >> 31:
            return S.FEATURE_NOT_SAVEABLE, 0
        v = cmd.cdw11
        if fid == S.FEAT_NUM_QUEUES:
            nsqr, ncqr = v & 0xFFFF, v >> 16
            if nsqr == 0xFFFF or ncqr == 0xFFFF:
                return S.INVALID_FIELD, 0
            if c.io_sqs or c.io_cqs:
                return S.COMMAND_SEQUENCE_ERROR, 0
            m = c.max_io_queues - 1
            self.queues_allocated = (min(nsqr, m), min(ncqr, m))
            self.queues_set = True
            nsq, ncq = self.queues_allocated
            return S.SUCCESS, nsq | ncq << 16
        if fid == S.FEAT_IRQ_CONFIG:
            iv = v & 0xFFFF
            if iv >= c.msix.vectors:
                return S.INVALID_FIELD, 0
            self.irq_config[iv] = v & 0x1FFFF
            c.set_coalescing()
            return S.SUCCESS, 0
        if fid == S.FEAT_TEMP_THRESHOLD:
            if (v >> 20) & 0x3:             # THSEL: only the over-temperature threshold
                return S.INVALID_FIELD, 0
            self.features[fid] = v & 0xFFFF
            return S.SUCCESS, 0
        if fid == S.FEAT_VOLATILE_WC:
            self.features[fid] = v & 1
            return S.SUCCESS, 0
        if fid == S.FEAT_IRQ_COALESCING:
            self.features[fid] = v & 0xFFFF
            c.set_coalescing()
            return S.SUCCESS, 0
        if fid in (S.FEAT_ARBITRATION, S.FEAT_POWER_MGMT, S.FEAT_ERROR_RECOVERY,
                   S.FEAT_WRITE_ATOMICITY, S.FEAT_ASYNC_EVENT_CONFIG):
            if fid == S.FEAT_POWER_MGMT and v & 0x1F:
                return S.INVALID_FIELD, 0            # only power state 0 (NPSS = 0)
            self.features[fid] = v
            return S.SUCCESS, 0
        return S.INVALID_FIELD, 0

    # -- logs ------------------------------------------------------------------------

    def get_log_page(self, cmd: Command) -> tuple[int, int]:
        c = self.ctrl
        lid = cmd.cdw10 & 0xFF
        rae = bool(cmd.cdw10 & (1 << 15))
        numd = ((cmd.cdw11 & 0xFFFF) << 16 | cmd.cdw10 >> 16) + 1
        length = numd * 4
        offset = cmd.cdw13 << 32 | cmd.cdw12
        if offset & 3:
            return S.INVALID_FIELD, 0
        if lid == S.LOG_ERROR:
            data = c.error_log()
            event_type = S.AER_TYPE_ERROR
        elif lid == S.LOG_SMART:
            if cmd.nsid not in (0, 0xFFFF_FFFF) and cmd.nsid not in c.namespaces:
                return S.INVALID_NAMESPACE, 0
            data = c.smart_log()
            event_type = S.AER_TYPE_SMART
        elif lid == S.LOG_FW_SLOT:
            data = bytearray(S.FW_SLOT_LOG_SIZE)
            data[0] = 1
            data[8:16] = c.firmware.encode().ljust(8)[:8]
            data = bytes(data)
            event_type = None
        else:
            return S.INVALID_LOG_PAGE, 0
        if offset >= len(data):
            return S.INVALID_FIELD, 0
        chunk = data[offset:offset + length]
        self._to_guest(cmd, chunk)
        if event_type is not None and not rae:
            self.aer_masked.discard(event_type)
            self.complete_aers()
        return S.SUCCESS, 0

    # -- AER, abort, doorbell buffer ------------------------------------------------------

    def async_event(self, cmd: Command) -> tuple[int, int] | None:
        if len(self.aer_cids) > AERL:
            return S.AER_LIMIT_EXCEEDED, 0
        self.aer_cids.append(cmd.cid)
        self.complete_aers()
        return None            # completes when an event happens

    def queue_event(self, event_type: int, info: int, log_page: int) -> None:
        if len(self.aer_events) < 16:
            self.aer_events.append((event_type, info, log_page))
        self.complete_aers()

    def complete_aers(self) -> None:
        while self.aer_cids:
            event = next((e for e in self.aer_events if e[0] not in self.aer_masked), None)
            if event is None:
                return
            self.aer_events.remove(event)
            self.aer_masked.add(event[0])       # until the host reads the log page
            cid = self.aer_cids.pop(0)
            self.ctrl.post_admin(cid, S.SUCCESS, event[0] | event[1] << 8 | event[2] << 16)

    def abort(self, cmd: Command) -> tuple[int, int]:
        # Commands run to completion as soon as they are fetched, so there
        # is never one in flight to abort: report "not aborted" (DW0 bit 0).
        return S.SUCCESS, 1

    def dbbuf_config(self, cmd: Command) -> tuple[int, int]:
        c = self.ctrl
        shadow, eventidx = cmd.prp1, cmd.prp2
        for addr in (shadow, eventidx):
            if addr == 0 or addr & (S.PAGE_SIZE - 1) or not c.mem.contains(addr, S.PAGE_SIZE):
                return S.INVALID_FIELD, 0
        if shadow == eventidx:
            return S.INVALID_FIELD, 0
        if not c.msix.enabled:
            # With pin interrupts (INTx) the controller must see every CQ
            # head update to drop the level, and a shadow CQ head is written
            # without one; refused, the host keeps MMIO doorbells (Linux
            # carries on without the buffer).
            return S.COMMAND_SEQUENCE_ERROR, 0
        c.configure_dbbuf(shadow, eventidx)
        return S.SUCCESS, 0

    _HANDLERS = {
        S.ADM_IDENTIFY: identify,
        S.ADM_CREATE_CQ: create_cq,
        S.ADM_CREATE_SQ: create_sq,
        S.ADM_DELETE_SQ: delete_sq,
        S.ADM_DELETE_CQ: delete_cq,
        S.ADM_GET_FEATURES: get_features,
        S.ADM_SET_FEATURES: set_features,
        S.ADM_GET_LOG_PAGE: get_log_page,
        S.ADM_ASYNC_EVENT: async_event,
        S.ADM_ABORT: abort,
        S.ADM_DBBUF_CONFIG: dbbuf_config,
    }


