"""A small NVMe host driver in Python that plays the guest.

It writes submission entries and doorbells exactly as a guest would
(through the MMIO bus, or the shadow doorbell buffer under the EventIdx
rule, or an ioeventfd's eventfd) and reads completions by phase bit. Tests
use it without KVM, and benchmarks use it for the in-process baseline.
"""
from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass, field
from typing import Callable

from hvkit.devices.bus import Bus
from hvkit.devices.nvme import spec as S
from hvkit.devices.nvme.command import make_command
from hvkit.memory.guest import GuestMemory

PAGE = S.PAGE_SIZE


@dataclass
class Completion:
    dw0: int
    sqhd: int
    sqid: int
    cid: int
    status: int          # SCT << 8 | SC (DNR and More stripped)
    dnr: bool


@dataclass
class HostQueue:
    qid: int
    sq_gpa: int
    cq_gpa: int
    entries: int
    vector: int = 0
    sq_tail: int = 0
    cq_head: int = 0
    phase: int = 1
    next_cid: int = 0
    outstanding: set[int] = field(default_factory=set)


class PageAllocator:
    """Bump allocator over a range of guest RAM the test reserves."""

    def __init__(self, start: int, end: int) -> None:
        self.next = -(-start // PAGE) * PAGE
        self.end = end

    def pages(self, n: int) -> int:
        addr = self.next
        if addr + n * PAGE > self.end:
            raise MemoryError("test page allocator exhausted")
        self.next += n * PAGE
        return addr


class HostDriver:
    """``doorbells``: "mmio" (every doorbell an MMIO write), "shadow"
    (shadow buffer + MMIO only when EventIdx asks), "ioeventfd" (shadow
    buffer + a signal on ``kick`` instead of the MMIO write, which is what
    KVM does for a registered ioeventfd)."""

    def __init__(self, mem: GuestMemory, mmio: Bus, bar0: int, alloc: PageAllocator,
                 doorbells: str = "mmio", kick: Callable[[], None] | None = None) -> None:
        self.mem = mem
        self.mmio = mmio
        self.bar0 = bar0
        self.alloc = alloc
        self.doorbells = "mmio"
        self.wanted_doorbells = doorbells
        self.kick = kick
        self.queues: dict[int, HostQueue] = {}
        self.shadow = 0
        self.eventidx = 0
        self.mmio_doorbells = 0
        self.other_admin: list[Completion] = []

    # -- registers ------------------------------------------------------------

    def r32(self, off: int) -> int:
        return struct.unpack("<I", self.mmio.read(self.bar0 + off, 4))[0]

    def r64(self, off: int) -> int:
        return struct.unpack("<Q", self.mmio.read(self.bar0 + off, 8))[0]

    def w32(self, off: int, value: int) -> None:
        self.mmio.write(self.bar0 + off, struct.pack("<I", value))

    def w64(self, off: int, value: int) -> None:
        self.mmio.write(self.bar0 + off, struct.pack("<Q", value))

    def enable(self, entries: int = 32) -> None:
        self.w32(S.REG_CC, 0)
        q = HostQueue(0, self.alloc.pages(1), self.alloc.pages(1), entries)
        self.mem.fill(q.sq_gpa, PAGE)
        self.mem.fill(q.cq_gpa, PAGE)          # no stale phase bits from an earlier life
        self.queues[0] = q
        self.w32(S.REG_AQA, (entries - 1) << 16 | (entries - 1))
        self.w64(S.REG_ASQ, q.sq_gpa)
        self.w64(S.REG_ACQ, q.cq_gpa)
        self.w32(S.REG_CC, S.CC_EN | S.SQES_LOG2 << S.CC_IOSQES_SHIFT | S.CQES_LOG2 << S.CC_IOCQES_SHIFT)
        if not self.r32(S.REG_CSTS) & S.CSTS_RDY:
            raise RuntimeError("controller did not become ready")

    def disable(self) -> None:
        self.w32(S.REG_CC, 0)
        for q in self.queues.values():
            q.sq_tail = q.cq_head = 0
            q.phase = 1
        self.queues = {0: self.queues[0]} if 0 in self.queues else {}
        self.doorbells = "mmio"

    # -- doorbells ------------------------------------------------------------------

    def _ring(self, qid: int, cq: bool, old: int, new: int) -> None:
        index = 2 * qid + (1 if cq else 0)
        if qid and self.doorbells != "mmio":
            self.mem.write_u32(self.shadow + 4 * index, new)
            ei = self.mem.read_u32(self.eventidx + 4 * index)
            if not S.need_event(ei, new, old):
                return
            if self.doorbells == "ioeventfd" and self.kick is not None:
                self.kick()
                return
        self.mmio_doorbells += 1
        self.w32(S.DOORBELL_BASE + 4 * index, new)

    # -- submission and completion ----------------------------------------------------

    def submit(self, qid: int, opcode: int, ring: bool = True, cid: int | None = None, **fields: int) -> int:
        q = self.queues[qid]
        if cid is None:
            cid = q.next_cid
            q.next_cid = (q.next_cid + 1) & 0xFFFF
        self.mem.write(q.sq_gpa + q.sq_tail * S.SQE_SIZE, make_command(opcode, cid=cid, **fields))
        old = q.sq_tail
        q.sq_tail = (q.sq_tail + 1) % q.entries
        q.outstanding.add(cid)
        if ring:
            self._ring(qid, False, old, q.sq_tail)
        return cid

    def ring_sq(self, qid: int, old: int) -> None:
        self._ring(qid, False, old, self.queues[qid].sq_tail)

    def reap(self, qid: int, want: int = 1, timeout: float = 5.0) -> list[Completion]:
        """Collect ``want`` completions (polling, for the accelerator's sake)."""
        q = self.queues[qid]
        out: list[Completion] = []
        deadline = time.monotonic() + timeout
        while len(out) < want:
            got = self._poll_cq(q)
            out += got
            if not got:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"queue {qid}: {len(out)} of {want} completions")
                time.sleep(0.0002)
        return out

    def poll(self, qid: int) -> list[Completion]:
        """The completions posted on ``qid`` so far, without waiting (a
        guest's busy-polling loop; the CQ head doorbell is rung if any)."""
        return self._poll_cq(self.queues[qid])

    def _poll_cq(self, q: HostQueue) -> list[Completion]:
        out = []
        old = q.cq_head
        while True:
            entry = q.cq_gpa + q.cq_head * S.CQE_SIZE
            # the phase dword first, the body after it (as a guest does with
            # an acquire load): the controller stores the body first
            dw3 = self.mem.read_u32(entry + 12)
            if (dw3 >> 16) & 1 != q.phase:
                break
            dw0, _r, sqhd, sqid = struct.unpack("<IIHH", self.mem.read(entry, 12))
            status = dw3 >> 17
            out.append(Completion(dw0, sqhd, sqid, dw3 & 0xFFFF, status & 0x7FF, bool(status >> 14)))
            self.queues.get(sqid, q).outstanding.discard(dw3 & 0xFFFF)
            q.cq_head += 1
            if q.cq_head == q.entries:
                q.cq_head = 0
                q.phase ^= 1
        if out:
            self._ring(q.qid, True, old, q.cq_head)
        return out

    def admin(self, opcode: int, **fields: int) -> Completion:
        cid = self.submit(0, opcode, **fields)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            found = None
            for c in self.reap(0, 1):
                if c.cid == cid:
                    found = c
                else:
                    self.other_admin.append(c)      # e.g. Asynchronous Event completions
            if found is not None:
                return found
        raise RuntimeError("admin completion lost")

    # -- set-up helpers -------------------------------------------------------------------

    def create_io_queues(self, qid: int, entries: int, vector: int = 0) -> Completion:
        q = HostQueue(qid, self.alloc.pages(-(-entries * S.SQE_SIZE // PAGE)),
                      self.alloc.pages(-(-entries * S.CQE_SIZE // PAGE)), entries, vector)
        self.mem.fill(q.sq_gpa, entries * S.SQE_SIZE)
        self.mem.fill(q.cq_gpa, entries * S.CQE_SIZE)
        c = self.admin(S.ADM_CREATE_CQ, prp1=q.cq_gpa, cdw10=(entries - 1) << 16 | qid,
                       cdw11=vector << 16 | 0x3)
        if c.status:
            return c
        c = self.admin(S.ADM_CREATE_SQ, prp1=q.sq_gpa, cdw10=(entries - 1) << 16 | qid,
                       cdw11=qid << 16 | 0x1)
        if not c.status:
            self.queues[qid] = q
        return c

    def configure_dbbuf(self) -> Completion:
        self.shadow = self.alloc.pages(1)
        self.eventidx = self.alloc.pages(1)
        self.mem.fill(self.shadow, PAGE)
        self.mem.fill(self.eventidx, PAGE)
        c = self.admin(S.ADM_DBBUF_CONFIG, prp1=self.shadow, prp2=self.eventidx)
        if not c.status:
            for q in self.queues.values():     # the shadow starts at the live values
                if q.qid:
                    self.mem.write_u32(self.shadow + 8 * q.qid, q.sq_tail)
                    self.mem.write_u32(self.shadow + 8 * q.qid + 4, q.cq_head)
            self.doorbells = self.wanted_doorbells
        return c

    def buffer(self, length: int) -> tuple[int, int, int]:
        """A data buffer of ``length`` bytes and its PRP1/PRP2 (a PRP list
        when it spans more than two pages)."""
        npages = -(-length // PAGE)
        data = self.alloc.pages(npages)
        if npages == 1:
            return data, data, 0
        if npages == 2:
            return data, data, data + PAGE
        lst = self.alloc.pages(-(-(npages - 1) * 8 // PAGE))
        for i in range(1, npages):
            self.mem.write_u64(lst + 8 * (i - 1), data + i * PAGE)
        return data, data, lst

    def identify(self, cns: int, nsid: int = 0) -> tuple[Completion, bytes]:
        buf, p1, p2 = self.buffer(4096)
        c = self.admin(S.ADM_IDENTIFY, nsid=nsid, prp1=p1, prp2=p2, cdw10=cns)
        return c, self.mem.read(buf, 4096)


def eventfd_kicker(fd: int) -> Callable[[], None]:
    """What a KVM ioeventfd does on a doorbell write: signal the eventfd."""
    return lambda: os.eventfd_write(fd, 1)
