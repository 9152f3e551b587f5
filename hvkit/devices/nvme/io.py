"""The NVM command set: Read, Write, Flush, Write Zeroes, Dataset Management.

Runs wherever the queue engine runs (the VMM in mode a, the accelerator
process otherwise). Every guest-supplied field is checked against the
namespace and guest RAM first; any failure becomes an NVMe status.
"""
from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

from hvkit.devices.nvme import spec as S
from hvkit.devices.nvme.command import Command
from hvkit.devices.nvme.namespace import Namespace
from hvkit.devices.nvme.prp import PrpError, map_prps
from hvkit.errors import GuestMemoryError
from hvkit.memory.guest import GuestMemory
from hvkit.storage.backend import StorageError

log = logging.getLogger(__name__)

BROADCAST_NSID = 0xFFFF_FFFF


@dataclass
class IoStats:
    """SMART counters (bytes, not the log's 512,000-byte units)."""

    bytes_read: int = 0
    bytes_written: int = 0
    read_commands: int = 0
    write_commands: int = 0
    media_errors: int = 0


class IoCommandSet:
    def __init__(self, mem: GuestMemory, namespaces: dict[int, Namespace],
                 max_transfer: int) -> None:
        self.mem = mem
        self.namespaces = namespaces
        self.max_transfer = max_transfer
        self.stats = IoStats()

    def execute(self, cmd: Command) -> tuple[int, int]:
        """Run one I/O command; returns (status, dw0). Never raises."""
        try:
            if cmd.fuse:
                return S.INVALID_FIELD, 0
            op = cmd.opcode
            if op == S.IO_READ or op == S.IO_WRITE:
                if cmd.psdt:
                    return S.INVALID_FIELD, 0      # SGLs are not supported (SGLS = 0)
                return self._rw(cmd, op == S.IO_WRITE), 0
            if op == S.IO_FLUSH:
                return self._flush(cmd), 0
            if op == S.IO_WRITE_ZEROES:
                return self._write_zeroes(cmd), 0
            if op == S.IO_DSM:
                if cmd.psdt:
                    return S.INVALID_FIELD, 0
                return self._dsm(cmd), 0
            return S.INVALID_OPCODE, 0
        except PrpError as exc:
            return exc.status, 0
        except GuestMemoryError:
            return S.DATA_TRANSFER_ERROR, 0
        except Exception:      # a bug must not take the queue down with it
            log.exception("NVMe I/O command %r failed", cmd)
            return S.INTERNAL_ERROR, 0

    def _ns(self, nsid: int) -> Namespace | None:
        return self.namespaces.get(nsid)

    def _range(self, ns: Namespace, slba: int, nlb: int) -> int:
        if slba + nlb > ns.nlb:
            return S.LBA_OUT_OF_RANGE
        return S.SUCCESS

    def _rw(self, cmd: Command, write: bool) -> int:
        ns = self._ns(cmd.nsid)
        if ns is None:
            return S.INVALID_NAMESPACE
        slba = cmd.cdw11 << 32 | cmd.cdw10
        nlb = (cmd.cdw12 & 0xFFFF) + 1
        status = self._range(ns, slba, nlb)
        if status:
            return status
        length = nlb << ns.lba_shift
        if length > self.max_transfer:
            return S.INVALID_FIELD
        if write and ns.read_only:
            return S.NAMESPACE_WRITE_PROTECTED
        runs = map_prps(self.mem, cmd.prp1, cmd.prp2, length)
        offset = slba << ns.lba_shift
        try:
            for gpa, n in runs:
                view = self.mem.view(gpa, n)
                try:
                    if write:
                        ns.backend.write(offset, view)
                    else:
                        ns.backend.readinto(offset, view)
                finally:
                    view.release()
                offset += n
            if write and cmd.cdw12 & (1 << 30):          # FUA
                ns.backend.flush()
        except StorageError as exc:
            log.warning("namespace %d: %s", ns.nsid, exc)
            self.stats.media_errors += 1
            return S.WRITE_FAULT if write else S.UNRECOVERED_READ_ERROR
        if write:
            self.stats.write_commands += 1
            self.stats.bytes_written += length
        else:
            self.stats.read_commands += 1
            self.stats.bytes_read += length
        return S.SUCCESS

    def _flush(self, cmd: Command) -> int:
        if cmd.nsid == BROADCAST_NSID:
            targets = list(self.namespaces.values())
        else:
            ns = self._ns(cmd.nsid)
            if ns is None:
                return S.INVALID_NAMESPACE
            targets = [ns]
        try:
            for ns in targets:
                ns.backend.flush()
        except StorageError as exc:
            log.warning("flush: %s", exc)
            self.stats.media_errors += 1
            return S.WRITE_FAULT
        return S.SUCCESS

    def _write_zeroes(self, cmd: Command) -> int:
        ns = self._ns(cmd.nsid)
        if ns is None:
            return S.INVALID_NAMESPACE
        slba = cmd.cdw11 << 32 | cmd.cdw10
        nlb = (cmd.cdw12 & 0xFFFF) + 1
        status = self._range(ns, slba, nlb)
        if status:
            return status
        if ns.read_only:
            return S.NAMESPACE_WRITE_PROTECTED
        try:
            ns.backend.write_zeroes(slba << ns.lba_shift, nlb << ns.lba_shift)
        except StorageError as exc:
            log.warning("namespace %d: %s", ns.nsid, exc)
            self.stats.media_errors += 1
            return S.WRITE_FAULT
        return S.SUCCESS

    def _dsm(self, cmd: Command) -> int:
        ns = self._ns(cmd.nsid)
        if ns is None:
            return S.INVALID_NAMESPACE
        nr = (cmd.cdw10 & 0xFF) + 1
        runs = map_prps(self.mem, cmd.prp1, cmd.prp2, nr * S.DSM_RANGE_SIZE)
        raw = b"".join(self.mem.read(gpa, n) for gpa, n in runs)
        ranges = []
        for i in range(nr):
            _attrs, nlb, slba = struct.unpack_from("<IIQ", raw, i * S.DSM_RANGE_SIZE)
            if nlb == 0:
                continue
            if slba + nlb > ns.nlb:
                return S.LBA_OUT_OF_RANGE
            ranges.append((slba, nlb))
        if not cmd.cdw11 & S.DSM_ATTR_DEALLOCATE:
            return S.SUCCESS          # integral read/write hints: advisory only
        if ns.read_only:
            return S.NAMESPACE_WRITE_PROTECTED
        try:
            for slba, nlb in ranges:
                ns.backend.discard(slba << ns.lba_shift, nlb << ns.lba_shift)
        except StorageError as exc:
            log.warning("namespace %d: %s", ns.nsid, exc)
            return S.WRITE_FAULT
        return S.SUCCESS
