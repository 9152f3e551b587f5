"""The queue engine: submission and completion rings read and written in
place in guest memory.

The same engine runs in the VMM (mode a: every doorbell is an MMIO write
handled in Python, which then calls ``process``) and in the accelerator
process (modes b and c: woken by an eventfd, it polls). Doorbell values come
from the *control page*, a small shared memfd the VMM writes MMIO doorbell
values into, or, once the guest has configured a Doorbell Buffer, from the
shadow doorbells in guest memory. The engine publishes its progress (SQ
heads, CQ tails and phases, counters) in the same page, so the VMM can
restart a dead accelerator where it left off.

Control page layout (8 KiB):
  [0, 4096)     doorbell mirror: SQ y tail at 8y, CQ y head at 8y + 4
  [4096, 8192)  state: counters (8 x u64) then, at 64 + 16 * qid,
                sq_head u32, cq_tail u32, cq_phase u32, reserved u32

Memory that another party reads while we write it (completion entries and
shadow doorbells in guest RAM, the control page) is written and read one
naturally aligned word at a time, each word in a single load or store
(``store_u32`` and friends), never with ``struct.pack_into``: that zeroes
its destination before it fills it in byte by byte, so a concurrent reader
can see a zero, or a value made of old and new bytes. A completion dword
seen as zero is a successful completion of command 0 whenever the host
expects phase 0; a doorbell mirror seen as zero or torn is an SQ tail the
guest never wrote, so entries past the real tail would be fetched.
"""
from __future__ import annotations

import logging
import struct
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

from hvkit.devices.nvme import spec as S
from hvkit.devices.nvme.command import Command
from hvkit.errors import GuestMemoryError
from hvkit.memory.guest import GuestMemory

log = logging.getLogger(__name__)

CTRL_PAGE_SIZE = 8192
STATE_BASE = 4096
COUNTERS = ("bytes_read", "bytes_written", "read_commands", "write_commands",
            "media_errors", "completions", "passes", "generation")
QUEUE_STATE_BASE = STATE_BASE + 64
QUEUE_STATE_SIZE = 16
MAX_QID = (CTRL_PAGE_SIZE - QUEUE_STATE_BASE) // QUEUE_STATE_SIZE - 1   # 251

_U32 = struct.Struct("<I")
_CQE_LOW = struct.Struct("<IIHH")
_LITTLE = sys.byteorder == "little"


def _le(value: int, size: int) -> int:
    """``value`` as a native word whose bytes in memory are little-endian."""
    return value if _LITTLE else int.from_bytes(value.to_bytes(size, "little"), sys.byteorder)


# A memoryview item assignment or read of format "I"/"Q" is a fixed-size
# memcpy in CPython, i.e. one load or store, atomic for an aligned word; the
# views below live for one statement so that they never pin the mapping.

def store_u32(buf, offset: int, value: int) -> None:
    """Store a little-endian u32 at ``offset`` (4-aligned) in one store."""
    with memoryview(buf)[offset:offset + 4] as raw, raw.cast("I") as word:
        word[0] = _le(value & 0xFFFF_FFFF, 4)


def load_u32(buf, offset: int) -> int:
    """Load a little-endian u32 at ``offset`` (4-aligned) in one load."""
    with memoryview(buf)[offset:offset + 4] as raw, raw.cast("I") as word:
        return _le(word[0], 4)


def store_u64(buf, offset: int, value: int) -> None:
    with memoryview(buf)[offset:offset + 8] as raw, raw.cast("Q") as word:
        word[0] = _le(value & 0xFFFF_FFFF_FFFF_FFFF, 8)


def load_u64(buf, offset: int) -> int:
    with memoryview(buf)[offset:offset + 8] as raw, raw.cast("Q") as word:
        return _le(word[0], 8)

#: executor(sqid, command) -> (status, dw0), or None if it completes later
Executor = Callable[[int, Command], Optional[tuple[int, int]]]

_fence_lock = threading.Lock()


def memory_fence() -> None:
    """A full barrier: taking a lock is a locked instruction on x86, which
    orders our EventIdx store before the shadow-doorbell load that follows."""
    with _fence_lock:
        pass


@dataclass
class CompletionQueue:
    qid: int
    gpa: int
    size: int
    vector: int
    ien: bool
    tail: int = 0
    phase: int = 1
    head: int = 0
    sqs: set[int] = field(default_factory=set)
    pending_irq: int = 0
    blocked: bool = False

    def full(self) -> bool:
        return (self.tail + 1) % self.size == self.head


@dataclass
class SubmissionQueue:
    qid: int
    gpa: int
    size: int
    cqid: int
    head: int = 0
    tail: int = 0


class QueueEngine:
    """Rings, doorbells and completions for a set of queues."""

    def __init__(self, mem: GuestMemory, ctrl_page: memoryview, executor: Executor,
                 irq: Callable[[int], None]) -> None:
        if len(ctrl_page) < CTRL_PAGE_SIZE:
            raise ValueError("control page must be 8 KiB")
        self.mem = mem
        self.page = ctrl_page
        self.executor = executor
        self.irq = irq
        self.sqs: dict[int, SubmissionQueue] = {}
        self.cqs: dict[int, CompletionQueue] = {}
        self.dbbuf: tuple[int, int] | None = None     # (shadow gpa, eventidx gpa)
        self.coalesce_threshold = 0                   # entries - 1, 0 = off
        self.coalesce_disabled_vectors: set[int] = set()
        self.shadow_errors = 0

    # -- queue set-up (called by the control plane) ----------------------------

    def create_cq(self, qid: int, gpa: int, size: int, vector: int, ien: bool,
                  tail: int = 0, phase: int = 1) -> CompletionQueue:
        if not 1 <= size <= 65536 or not 0 <= tail < size or phase not in (0, 1):
            # a tail past the end would never wrap: entries off the ring
            raise ValueError(f"CQ {qid} of {size} entries: tail {tail}, phase {phase}")
        cq = CompletionQueue(qid, gpa, size, vector, ien, tail=tail, phase=phase)
        cq.head = tail
        self.cqs[qid] = cq
        if self.dbbuf is not None and qid:
            self._shadow_write(self.dbbuf[1], qid, True, (tail - 1) & 0xFFFF)
        self._publish_queue(qid)
        return cq

    def create_sq(self, qid: int, gpa: int, size: int, cqid: int, head: int = 0) -> SubmissionQueue:
        if not 1 <= size <= 65536 or not 0 <= head < size:
            raise ValueError(f"SQ {qid} of {size} entries: head {head}")
        sq = SubmissionQueue(qid, gpa, size, cqid, head=head, tail=head)
        self.sqs[qid] = sq
        self.cqs[cqid].sqs.add(qid)
        if self.dbbuf is not None and qid:
            self._shadow_write(self.dbbuf[1], qid, False, head)
        self._publish_queue(qid)
        return sq

    def delete_sq(self, qid: int) -> None:
        sq = self.sqs.pop(qid, None)
        if sq is not None and sq.cqid in self.cqs:
            self.cqs[sq.cqid].sqs.discard(qid)

    def delete_cq(self, qid: int) -> None:
        self.cqs.pop(qid, None)

    def reset(self) -> None:
        self.sqs.clear()
        self.cqs.clear()
        self.dbbuf = None
        self.coalesce_threshold = 0
        self.coalesce_disabled_vectors.clear()

    def set_dbbuf(self, shadow_gpa: int, eventidx_gpa: int, initialise: bool = True) -> None:
        """Take doorbells from the guest's shadow buffer from now on
        (I/O queues only; the admin queue always uses MMIO, as Linux does).
        ``initialise`` copies the MMIO doorbell values into the shadow, for
        queues that existed before the guest configured the buffer; a
        restarted accelerator resumes with ``initialise=False``, since the
        shadow then holds the guest's newer values."""
        if not initialise:
            self.dbbuf = (shadow_gpa, eventidx_gpa)
            return
        for qid, sq in self.sqs.items():
            if qid:     # the shadow starts where the MMIO doorbells are
                self.refresh(sq)
                self._shadow_write(shadow_gpa, qid, False, sq.tail)
                self._shadow_write(eventidx_gpa, qid, False, sq.tail)
        for qid, cq in self.cqs.items():
            if qid:
                self._shadow_write(shadow_gpa, qid, True, cq.head)
                self._shadow_write(eventidx_gpa, qid, True, (cq.head - 1) & 0xFFFF)
        self.dbbuf = (shadow_gpa, eventidx_gpa)

    # -- doorbells ----------------------------------------------------------------

    def mirror_set(self, qid: int, cq: bool, value: int) -> None:
        """Record an MMIO doorbell write (the VMM's side only; the
        accelerator reads it meanwhile, so one store)."""
        store_u32(self.page, 8 * qid + (4 if cq else 0), value)

    def mirror_get(self, qid: int, cq: bool) -> int:
        return load_u32(self.page, 8 * qid + (4 if cq else 0))

    def _shadow_read(self, base: int, qid: int, cq: bool) -> int | None:
        try:
            view = self.mem.view(base + 4 * (2 * qid + (1 if cq else 0)), 4)
        except GuestMemoryError:
            self.shadow_errors += 1
            return None
        with view:
            return load_u32(view, 0)

    def _shadow_write(self, base: int, qid: int, cq: bool, value: int) -> None:
        try:
            view = self.mem.view(base + 4 * (2 * qid + (1 if cq else 0)), 4)
        except GuestMemoryError:
            self.shadow_errors += 1
            return
        with view:
            store_u32(view, 0, value)

    def _doorbell(self, qid: int, cq: bool) -> int | None:
        if self.dbbuf is not None and qid:
            return self._shadow_read(self.dbbuf[0], qid, cq)
        return self.mirror_get(qid, cq)

    def refresh(self, sq: SubmissionQueue) -> None:
        """Pick up the latest valid doorbell values for ``sq`` and its CQ.
        Out-of-range values (the guest's mistake) are ignored."""
        tail = self._doorbell(sq.qid, False)
        if tail is not None and tail < sq.size:
            sq.tail = tail
        cq = self.cqs.get(sq.cqid)
        if cq is not None:
            self.refresh_cq(cq)

    def refresh_cq(self, cq: CompletionQueue) -> None:
        head = self._doorbell(cq.qid, True)
        if head is not None and head < cq.size:
            cq.head = head

    def update_event_indexes(self) -> None:
        """Ask the guest to ring the MMIO doorbell on its next SQ tail
        update (EventIdx = the tail we have seen), and on its next CQ head
        update only for CQs we are blocked on. Call before going idle."""
        if self.dbbuf is None:
            return
        ei = self.dbbuf[1]
        for qid, sq in self.sqs.items():
            if qid:
                self._shadow_write(ei, qid, False, sq.tail)
        for qid, cq in self.cqs.items():
            if qid:
                self._shadow_write(ei, qid, True, cq.head if cq.blocked else (cq.head - 1) & 0xFFFF)

    def has_work(self) -> bool:
        """Re-read the doorbells: is any SQ non-empty with room in its CQ?"""
        for sq in self.sqs.values():
            self.refresh(sq)
            if sq.head != sq.tail:
                cq = self.cqs.get(sq.cqid)
                if cq is not None and not cq.full():
                    return True
        return False

    # -- the data path -------------------------------------------------------------------

    def process(self, qids: list[int] | None = None, budget: int | None = None) -> int:
        """Fetch, run and complete commands from the given SQs (all if None),
        round robin, until they are empty, their CQs are full or ``budget``
        commands have run (default: one lap of every ring, so that a guest
        whose rings or shadow doorbells overlap cannot keep us here forever);
        then raise the interrupts owed. Returns the count."""
        sqs = [self.sqs[q] for q in (qids if qids is not None else list(self.sqs)) if q in self.sqs]
        if budget is None:
            budget = sum(sq.size for sq in sqs)
        for sq in sqs:
            self.refresh(sq)
        done = 0
        progress = True
        while progress and done < budget:
            progress = False
            for sq in sqs:
                if sq.head == sq.tail or self.sqs.get(sq.qid) is not sq:
                    continue
                cq = self.cqs.get(sq.cqid)
                if cq is None:
                    continue
                if cq.full():
                    self.refresh_cq(cq)
                    if cq.full():
                        cq.blocked = True
                        continue
                cq.blocked = False
                try:
                    raw = self.mem.read(sq.gpa + sq.head * S.SQE_SIZE, S.SQE_SIZE)
                except GuestMemoryError:
                    # The ring itself left guest RAM (it was checked at creation,
                    # so RAM was unplugged); stop this queue rather than spin.
                    log.warning("SQ %d ring at %#x is outside guest RAM", sq.qid, sq.gpa)
                    sq.head = sq.tail
                    continue
                sq.head = (sq.head + 1) % sq.size
                cmd = Command.decode(raw)
                result = self.executor(sq.qid, cmd)
                if result is not None:
                    self.post(cq.qid, sq.qid, cmd.cid, result[0], result[1])
                done += 1
                progress = True
                if done >= budget:
                    break
            if not progress:
                # pick up doorbells rung while we worked
                for sq in sqs:
                    old = sq.tail
                    self.refresh(sq)
                    if sq.tail != old:
                        progress = True
        self.flush_interrupts()
        return done

    def post(self, cqid: int, sqid: int, cid: int, status: int, dw0: int = 0) -> bool:
        """Write one completion entry with the current phase; returns False
        if the CQ is gone or full (the caller's entry is then lost, as on
        hardware whose host overran its CQ)."""
        cq = self.cqs.get(cqid)
        if cq is None:
            return False
        if cq.full():
            self.refresh_cq(cq)
            if cq.full():
                return False
        sq = self.sqs.get(sqid)
        sqhd = sq.head if sq is not None else 0
        if status and status != S.SUCCESS:
            status |= S.STATUS_DNR
        addr = cq.gpa + cq.tail * S.CQE_SIZE
        try:
            view = self.mem.view(addr, S.CQE_SIZE)
        except GuestMemoryError:
            log.warning("CQ %d ring at %#x is outside guest RAM", cqid, cq.gpa)
            return False
        with view:
            # the host ignores the body until the phase bit flips
            _CQE_LOW.pack_into(view, 0, dw0 & 0xFFFF_FFFF, 0, sqhd, sqid)
            # the dword with the phase bit goes last, so the host never sees
            # a new phase with a stale body, and in one store: the host polls
            # it from another CPU, and an intermediate value (pack_into zeroes
            # first) reads as a completion, of command 0 when phase is 0
            store_u32(view, 12, (cid & 0xFFFF) | cq.phase << 16 | (status & 0x7FFF) << 17)
        cq.tail += 1
        if cq.tail == cq.size:
            cq.tail = 0
            cq.phase ^= 1
        self._publish_queue(cqid)
        if sq is not None and sqid != cqid:
            self._publish_queue(sqid)
        if cq.ien:
            cq.pending_irq += 1
            thr = self.coalesce_threshold
            if thr and cqid and cq.vector not in self.coalesce_disabled_vectors \
                    and cq.pending_irq > thr:
                cq.pending_irq = 0
                self.irq(cq.vector)
        if cqid:
            self._bump("completions")
        return True

    def flush_interrupts(self) -> None:
        vectors = set()
        for cq in self.cqs.values():
            if cq.pending_irq:
                cq.pending_irq = 0
                vectors.add(cq.vector)
        for v in sorted(vectors):
            self.irq(v)

    # -- published state (for the VMM and for restarts) ----------------------------------

    def _publish_queue(self, qid: int) -> None:
        if qid > MAX_QID:
            return
        off = QUEUE_STATE_BASE + QUEUE_STATE_SIZE * qid
        sq = self.sqs.get(qid)
        cq = self.cqs.get(qid)
        if sq is not None:
            store_u32(self.page, off, sq.head)
        if cq is not None:
            store_u32(self.page, off + 4, cq.tail)
            store_u32(self.page, off + 8, cq.phase)

    def _bump(self, name: str, n: int = 1) -> None:
        off = STATE_BASE + 8 * COUNTERS.index(name)
        store_u64(self.page, off, load_u64(self.page, off) + n)

    def publish_counters(self, values: dict[str, int]) -> None:
        for name, value in values.items():
            store_u64(self.page, STATE_BASE + 8 * COUNTERS.index(name), value)

    def recover(self) -> None:
        """After a restart: the dead process may have posted completions
        after it last published. An entry at our CQ tail that already
        carries the current phase was posted by it; its SQ Head field tells
        how far that SQ had been fetched. Commands fetched but never
        completed are fetched again (the guest has not seen them finish, so
        running them again is what a controller reset would allow)."""
        for cq in self.cqs.values():
            for _ in range(cq.size):
                try:
                    raw = self.mem.read(cq.gpa + cq.tail * S.CQE_SIZE, S.CQE_SIZE)
                except GuestMemoryError:
                    break
                _dw0, _r, sqhd, sqid = _CQE_LOW.unpack_from(raw, 0)
                dw3 = _U32.unpack_from(raw, 12)[0]
                if (dw3 >> 16) & 1 != cq.phase:
                    break
                sq = self.sqs.get(sqid)
                if sq is None or sq.cqid != cq.qid or sqhd >= sq.size:
                    break       # not one of ours: the guest wrote it there
                sq.head = sqhd
                cq.tail += 1
                if cq.tail == cq.size:
                    cq.tail = 0
                    cq.phase ^= 1
                cq.pending_irq += 1
            self._publish_queue(cq.qid)
        for qid in self.sqs:
            self._publish_queue(qid)


def read_queue_state(page: memoryview, qid: int) -> tuple[int, int, int]:
    """(sq_head, cq_tail, cq_phase) as last published for ``qid``."""
    off = QUEUE_STATE_BASE + QUEUE_STATE_SIZE * qid
    return load_u32(page, off), load_u32(page, off + 4), load_u32(page, off + 8)


def read_counters(page: memoryview) -> dict[str, int]:
    return {name: load_u64(page, STATE_BASE + 8 * i) for i, name in enumerate(COUNTERS)}
