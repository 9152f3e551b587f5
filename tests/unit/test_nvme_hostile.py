"""A hostile guest: random registers, doorbells and commands.

Whatever the guest does, the controller answers with NVMe statuses (never
Internal Error, which would mean a bug was caught), no exception reaches
the VMM, the disk never grows, memory outside the guest's RAM regions is
never named in an access, and after a controller reset a well-formed
command still works.
"""
from __future__ import annotations

import logging
import os
import random
import struct
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvkit.devices.bus import Bus
from hvkit.devices.irq import RecordingMsi
from hvkit.devices.nvme import NvmeController
from hvkit.devices.nvme import spec as S
from hvkit.devices.nvme.driver import HostDriver, PageAllocator, eventfd_kicker
from hvkit.devices.pci import BarAllocator, PciBus
from hvkit.memory.guest import GuestMemory, MemoryRegion
from hvkit.storage.raw import RawFileBackend

LOW = 2 << 20                 # RAM [0, 2 MiB) and [4 MiB, 5 MiB); a hole between
HIGH_GPA, HIGH = 4 << 20, 1 << 20
DISK = 256 * 1024

ADMIN_OPS = [S.ADM_DELETE_SQ, S.ADM_CREATE_SQ, S.ADM_GET_LOG_PAGE, S.ADM_DELETE_CQ,
             S.ADM_CREATE_CQ, S.ADM_IDENTIFY, S.ADM_ABORT, S.ADM_SET_FEATURES,
             S.ADM_GET_FEATURES, S.ADM_ASYNC_EVENT, S.ADM_DBBUF_CONFIG]
IO_OPS = [S.IO_FLUSH, S.IO_WRITE, S.IO_READ, S.IO_WRITE_ZEROES, S.IO_DSM]
INTERESTING = [0, 1, 2, 3, 7, 8, 0xFF, 0x1000, 0xFFF, 0xFFFF, 0x10000, 0xFFFF_FFFF,
               LOW - 8, LOW - 4096, LOW, LOW + 4096, HIGH_GPA, HIGH_GPA + HIGH - 4096,
               HIGH_GPA + HIGH, 0x10_0000, 0x1F_F000, 1 << 63, (1 << 64) - 1,
               (1 << 64) - 4096]


class Trap(logging.Handler):
    """Any exception the controller caught and logged is a failure here."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def build(tmpdir: str, accelerator: bool = False):
    mem = GuestMemory([MemoryRegion(0, LOW, name="low"), MemoryRegion(HIGH_GPA, HIGH, name="high")])
    disks = [RawFileBackend.create(os.path.join(tmpdir, "a.img"), DISK),
             RawFileBackend.create(os.path.join(tmpdir, "b.img"), DISK, block_size=4096)]
    ctrl = NvmeController(mem, disks, msi=RecordingMsi(), max_io_queues=4, max_queue_entries=64)
    acc = ctrl.use_accelerator(poll_us=500) if accelerator else None
    pci = PciBus()
    pci.add(ctrl)
    BarAllocator().assign(pci)
    mmio = Bus("mmio")
    for bar in ctrl.bars:
        if bar is not None:
            mmio.register(bar.mapped_at, bar.size, bar.region)
    drv = HostDriver(mem, mmio, ctrl.bars[0].mapped_at, PageAllocator(0x10_0000, LOW),
                     kick=eventfd_kicker(acc.kick_fd) if acc else None)
    drv.enable(entries=16)
    assert drv.create_io_queues(1, 16).status == 0
    return mem, disks, ctrl, mmio, drv


def check_sane(mem, disks, ctrl, mmio, drv) -> None:
    """Reset, then prove the controller still does honest work."""
    drv.disable()
    drv.alloc = PageAllocator(0x10_0000, LOW)
    drv.enable(entries=16)
    c = drv.create_io_queues(1, 16)
    assert c.status == 0, c
    payload = os.urandom(4096)
    buf, p1, p2 = drv.buffer(4096)
    mem.write(buf, payload)
    drv.submit(1, S.IO_WRITE, nsid=1, prp1=p1, cdw10=16, cdw12=7)
    assert drv.reap(1)[0].status == 0
    mem.fill(buf, 4096)
    drv.submit(1, S.IO_READ, nsid=1, prp1=p1, cdw10=16, cdw12=7)
    assert drv.reap(1)[0].status == 0
    assert mem.read(buf, 4096) == payload
    for d in disks:
        assert os.path.getsize(d.path) == DISK


def field(draw, bits: int = 32) -> int:
    v = draw(st.one_of(st.sampled_from(INTERESTING), st.integers(0, 64),
                       st.integers(0, (1 << bits) - 1)))
    return v & ((1 << bits) - 1)


@st.composite
def actions(draw):
    kind = draw(st.sampled_from(["admin", "io", "io", "doorbell", "register", "garbage_sq"]))
    if kind in ("admin", "io"):
        ops = ADMIN_OPS if kind == "admin" else IO_OPS
        opcode = draw(st.one_of(st.sampled_from(ops), st.integers(0, 255)))
        return (kind, opcode, dict(
            nsid=draw(st.sampled_from([1, 1, 1, 2, 2, 0, 3, 0xFFFF_FFFF])),
            prp1=draw(st.one_of(st.sampled_from([0x10_0000, 0x1F_F000, HIGH_GPA + 0x1000]),
                                st.just(field(draw, 64)))),
            prp2=field(draw, 64),
            cdw10=field(draw), cdw11=draw(st.sampled_from([0, 0, field(draw)])),
            cdw12=draw(st.one_of(st.integers(0, 40), st.just(field(draw)))),
            cdw13=field(draw), flags=draw(st.sampled_from([0, 0, 1, 0x40]))))
    if kind == "doorbell":
        return (kind, draw(st.integers(0, 12)), draw(st.sampled_from([0, 1, 5, 15, 16, 17, 0xFFFF, 0xFFFF_FFFF])))
    if kind == "register":
        off = draw(st.sampled_from([0, 4, 8, 0xC, 0x10, 0x14, 0x1C, 0x20, 0x24, 0x28, 0x2C,
                                    0x30, 0x34, 0x38, 0x100, 0xFFC]))
        size = draw(st.sampled_from([1, 2, 4, 8]))
        return (kind, off, field(draw, 8 * size).to_bytes(size, "little"))
    return (kind, draw(st.integers(0, 15)), draw(st.binary(min_size=64, max_size=64)))


def run(drv: HostDriver, mem, mmio, ctrl, steps) -> None:
    for kind, a, b in steps:
        if kind == "admin" and 0 in drv.queues:
            drv.submit(0, a, **b)
        elif kind == "io" and 1 in drv.queues:
            drv.submit(1, a, **b)
        elif kind == "doorbell":
            mmio.write(ctrl.bars[0].mapped_at + S.DOORBELL_BASE + 4 * a, struct.pack("<I", b))
        elif kind == "register":
            mmio.write(ctrl.bars[0].mapped_at + a, b)
            mmio.read(ctrl.bars[0].mapped_at + a, len(b))
        elif kind == "garbage_sq" and 1 in drv.queues:
            q = drv.queues[1]
            mem.write(q.sq_gpa + 64 * a, b)
            old = q.sq_tail
            q.sq_tail = (a + 1) % q.entries
            drv.ring_sq(1, old)


def completions(drv: HostDriver) -> list:
    out = []
    for q in list(drv.queues.values()):
        try:
            out += drv._poll_cq(q)
        except Exception:
            pass         # the guest's own view may be garbage; the device's is what we test
    return out


@settings(max_examples=120, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.lists(actions(), min_size=1, max_size=40))
def test_random_guest_in_process(steps):
    trap = Trap()
    logging.getLogger("hvkit").addHandler(trap)
    with tempfile.TemporaryDirectory() as tmp:
        mem, disks, ctrl, mmio, drv = build(tmp)
        try:
            run(drv, mem, mmio, ctrl, steps)
            for c in completions(drv):
                assert c.status != S.INTERNAL_ERROR, c
            assert not trap.records, [r.getMessage() for r in trap.records]
            check_sane(mem, disks, ctrl, mmio, drv)
        finally:
            logging.getLogger("hvkit").removeHandler(trap)
            ctrl.close()
            for d in disks:
                d.close()
            mem.close()


def test_random_guest_against_the_accelerator():
    """The same abuse, served by the accelerator process: it must neither
    die nor stop serving."""
    rng = random.Random(4)
    with tempfile.TemporaryDirectory() as tmp:
        mem, disks, ctrl, mmio, drv = build(tmp, accelerator=True)
        try:
            for _ in range(400):
                q = rng.choice([0, 1, 1, 1])
                op = rng.choice(ADMIN_OPS if q == 0 else IO_OPS + [rng.randrange(256)])
                fields = {k: rng.choice(INTERESTING + [rng.getrandbits(bits)]) & ((1 << bits) - 1)
                          for k, bits in (("prp1", 64), ("prp2", 64), ("cdw10", 32),
                                          ("cdw11", 32), ("cdw12", 32))}
                if q == 0 and op in (S.ADM_DELETE_SQ, S.ADM_DELETE_CQ):
                    continue       # keep queue 1, so the accelerator stays busy
                drv.submit(q, op, nsid=rng.choice([0, 1, 2, 9]), **fields)
                if rng.random() < 0.1:
                    mmio.write(ctrl.bars[0].mapped_at + S.DOORBELL_BASE + 8,
                               struct.pack("<I", rng.choice([17, 0xFFFF, 3])))
                completions(drv)
            assert ctrl.accelerator.alive() and ctrl.accelerator.restarts == 0
            check_sane(mem, disks, ctrl, mmio, drv)
            assert ctrl.accelerator.restarts == 0
        finally:
            ctrl.close()
            for d in disks:
                d.close()
            mem.close()
