"""Completions from the accelerator process as a busy-polling host sees them.

The accelerator writes completion entries into guest RAM from another
process while the host polls the phase bit, so an entry must never be
visible half-written: a dword that carries the new phase must carry the
command identifier and status of the same store. A host at queue depth > 1
that reuses its buffers by command identifier (as guests/nvme.c and Linux
do) turns any such transient into a completion for a command it never
submitted, or a READ it believes done before its data is in memory.

The same holds for the doorbell values the VMM stores for the accelerator
(mode b) and the guest stores in its shadow buffer (mode c).

No KVM needed: guest RAM is a memfd shared with the accelerator process,
the test plays the guest with a tight polling loop (no sleeps), so it
looks at the entry under construction as often as a vCPU would.
"""
from __future__ import annotations

import itertools
import mmap
import os
import struct
import time

import pytest

from hvkit.devices.bus import Bus
from hvkit.devices.irq import RecordingMsi
from hvkit.devices.nvme import NvmeController
from hvkit.devices.nvme import spec as S
from hvkit.devices.nvme.driver import HostDriver, PageAllocator, eventfd_kicker
from hvkit.devices.nvme.engine import QueueEngine
from hvkit.devices.pci import BarAllocator, PciBus
from hvkit.memory.guest import GuestMemory
from hvkit.storage.raw import RawFileBackend

MEM = 16 << 20
DISK = 8 << 20
ENTRIES = 64            # CQ laps alternate the expected phase 1, 0, 1, ...
SLOTS = 64
LBAS = 512              # 4 KiB pages used on the namespace


def pattern(page: int) -> bytes:
    """What the host writes to ``page``: a function of the page alone."""
    return struct.pack("<Q", page << 32 | 0x5EED) * (4096 // 8)


class Rig:
    def __init__(self, tmp_path, doorbells: str) -> None:
        self.mem = GuestMemory.create(MEM)
        self.disk = RawFileBackend.create(tmp_path / "disk.img", DISK)
        self.ctrl = NvmeController(self.mem, [self.disk], msi=RecordingMsi())
        # a long poll keeps the accelerator on the shadow doorbells, the
        # steady state of mode "shadow"
        self.acc = self.ctrl.use_accelerator(poll_us=200_000)
        pci = PciBus()
        pci.add(self.ctrl)
        BarAllocator().assign(pci)
        self.mmio = Bus("mmio")
        for bar in self.ctrl.bars:
            if bar is not None:
                self.mmio.register(bar.mapped_at, bar.size, bar.region)
        self.drv = HostDriver(self.mem, self.mmio, self.ctrl.bars[0].mapped_at,
                              PageAllocator(1 << 20, MEM), doorbells=doorbells,
                              kick=eventfd_kicker(self.acc.kick_fd))
        self.drv.enable()
        # MSI-X on, every vector masked (the host polls): shadow doorbells
        # are refused with pin interrupts
        self.ctrl.config_write(self.ctrl.msix.cap_offset + 2, struct.pack("<H", 0x8000))
        assert self.drv.create_io_queues(1, ENTRIES).status == 0
        if doorbells != "mmio":
            assert self.drv.configure_dbbuf().status == 0

    def close(self) -> None:
        self.ctrl.close()
        self.disk.close()
        self.mem.close()


# "mmio": mode b, the VMM stores each doorbell value in the control page
# while the accelerator polls it (a value seen torn or zero is an SQ tail the
# host never wrote: entries past the real tail, stale, would be fetched);
# "ioeventfd" and "shadow": mode c, doorbells in the shadow buffer
@pytest.fixture(params=["native", "python"])
def engine(request, monkeypatch):
    """The queue engine in the accelerator process (C, or the Python reference)."""
    if request.param == "native":
        pytest.importorskip("hvkit._nvme_native")
    monkeypatch.setenv("HVKIT_NVME_ENGINE", request.param)
    return request.param


@pytest.fixture(params=["mmio", "ioeventfd", "shadow"])
def rig(request, tmp_path, engine):
    r = Rig(tmp_path, request.param)
    yield r
    r.close()


def run_io(d: HostDriver, opcode: int, count: int, qd: int, bufs: list[int],
           deadline: float) -> int:
    """``count`` one-page commands on pages 0, 1, 2, ... at depth ``qd``;
    buffer slot = command identifier, slots from a free stack and back on
    completion. Every completion must name a command in flight, and a READ
    must have its data in place when its completion is seen. Returns the
    number of completions seen."""
    free = list(range(SLOTS))
    page_of: dict[int, int] = {}
    issued = done = 0
    q = d.queues[1]
    while done < count:
        old = q.sq_tail
        while len(page_of) < qd and issued < count:
            slot = free.pop()
            page = issued % LBAS
            page_of[slot] = page
            if opcode == S.IO_WRITE:
                d.mem.write(bufs[slot], pattern(page))
            d.submit(1, opcode, ring=False, cid=slot, nsid=1, prp1=bufs[slot],
                     cdw10=8 * page, cdw12=7)
            issued += 1
        if q.sq_tail != old:
            d.ring_sq(1, old)
        got = []
        while not got:
            got = d.poll(1)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{done} of {count} completions")
        for c in got:
            assert c.sqid == 1 and c.status == 0, c
            assert c.cid in page_of, (
                f"completion {done} names cid {c.cid}, which is not in flight "
                f"(in flight: {sorted(page_of)})")
            page = page_of.pop(c.cid)
            if opcode == S.IO_READ:
                data = d.mem.read(bufs[c.cid], 4096)
                assert data == pattern(page), (
                    f"READ of page {page} into slot {c.cid} completed before its data "
                    f"arrived (slot holds page {struct.unpack_from('<Q', data)[0] >> 32})")
            free.append(c.cid)
            done += 1
    return done


@pytest.mark.parametrize("qd", [4, 16])
def test_polling_host_never_sees_a_half_written_completion(rig, qd):
    d = rig.drv
    base = d.alloc.pages(SLOTS)
    bufs = [base + 4096 * i for i in range(SLOTS)]
    deadline = time.monotonic() + 120
    # many CQ laps, so that half of them expect phase 0: an all-zero dword
    # then reads as a successful completion of cid 0
    for _ in range(2):
        assert run_io(d, S.IO_WRITE, 1024, qd, bufs, deadline) == 1024
        for b in bufs:                          # reads must bring every byte
            d.mem.fill(b, 4096)
        assert run_io(d, S.IO_READ, 1024, qd, bufs, deadline) == 1024


def test_posted_entry_carries_phase_cid_and_status_in_one_dword():
    """The entry's layout over a phase-1 lap and a phase-0 lap."""
    mem = GuestMemory.create(1 << 20)
    try:
        page = memoryview(bytearray(8192))
        e = QueueEngine(mem, page, lambda _q, _c: None, lambda _v: None)
        cq = e.create_cq(1, 0x10000, 4, 0, False)
        e.create_sq(1, 0x20000, 4, 1)
        # phase 1 lap, then a phase 0 lap
        for lap in range(2):
            for i in range(4):
                mem.write(0x10000 + 16 * i, b"\xff" * 16)
            for i in range(4):
                cq.head = cq.tail                  # the host has consumed everything
                assert e.post(1, 1, 0x1234, 0x2, 0x55)
                raw = mem.read(0x10000 + 16 * i, 16)
                dw0, _r, sqhd, sqid, dw3 = struct.unpack("<IIHHI", raw)
                assert (dw0, sqid) == (0x55, 1)
                assert dw3 & 0xFFFF == 0x1234
                assert (dw3 >> 16) & 1 == 1 - lap
                assert (dw3 >> 17) & 0x7FFF == 0x2 | S.STATUS_DNR
    finally:
        mem.close()


def _race(writer, reader, valid: set[int], seconds: float = 0.5) -> set[int]:
    """Run ``writer()`` in a loop in a forked child (another CPU, as the
    accelerator is) while this process calls ``reader()``; return the
    values read that are not in ``valid``."""
    stop = mmap.mmap(-1, mmap.PAGESIZE)          # shared with the child
    pid = os.fork()
    if pid == 0:                                  # pragma: no cover (child)
        try:
            while not stop[0]:
                writer()
        finally:
            os._exit(0)
    bad: set[int] = set()
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end and len(bad) < 8:
            for _ in range(1000):
                v = reader()
                if v not in valid:
                    bad.add(v)
    finally:
        stop[0] = 1
        os.waitpid(pid, 0)
        stop.close()
    return bad


def test_completion_dword_is_never_seen_half_written():
    """A host polling the entry the engine is posting sees the old dword or
    the new one, nothing in between (not zero: cid 0, success, phase 0)."""
    mem = GuestMemory.create(1 << 20)
    try:
        e = QueueEngine(mem, memoryview(mmap.mmap(-1, 8192)), lambda _q, _c: None,
                        lambda _v: None)
        cq = e.create_cq(1, 0x10000, 2, 0, False)
        e.create_sq(1, 0x20000, 2, 1)
        for _ in range(2):                   # both entries hold a posted dword
            cq.head = cq.tail
            assert e.post(1, 1, 0x2B3C, 0)
        cids = itertools.count()

        def writer() -> None:
            cq.head = cq.tail                # the host keeps up
            e.post(1, 1, 0x2B3C if next(cids) & 1 else 0x4D5E, 0)

        valid = {cid | phase << 16 for cid in (0x2B3C, 0x4D5E) for phase in (0, 1)}
        reads = [lambda a=a: struct.unpack("<I", mem.read(a, 4))[0]
                 for a in (0x10000 + 12, 0x10000 + 16 + 12)]
        flip = itertools.count()
        bad = _race(writer, lambda: reads[next(flip) & 1](), valid)
        assert not bad, f"the host saw completion dwords {sorted(map(hex, bad))}"
    finally:
        mem.close()


def test_doorbell_mirror_is_never_seen_torn():
    """Mode b: the VMM stores each MMIO doorbell value in the control page
    while the accelerator reads it; a value in between is an SQ tail the
    guest never wrote."""
    page = memoryview(mmap.mmap(-1, 8192))
    mem = GuestMemory.create(1 << 20)
    try:
        vmm = QueueEngine(mem, page, lambda _q, _c: None, lambda _v: None)
        acc = QueueEngine(mem, page, lambda _q, _c: None, lambda _v: None)
        values = (0x0102, 0x0A0B)                 # every byte differs
        vmm.mirror_set(1, False, values[0])
        n = itertools.count()

        def writer() -> None:
            vmm.mirror_set(1, False, values[next(n) & 1])

        bad = _race(writer, lambda: acc.mirror_get(1, False), set(values))
        assert not bad, f"the accelerator read SQ tails {sorted(map(hex, bad))}"
    finally:
        page.release()
        mem.close()
