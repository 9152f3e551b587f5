"""The C queue engine (hvkit._nvme_native) against the Python reference.

Hostile commands (bad PRPs, PRP lists outside RAM, wrong namespaces and
queue ids, oversized transfers, LBA ranges that overflow) must get the
statuses the Python engine gives them, with no access outside guest RAM;
scripted queue scenarios must leave the same completion entries, control
page and interrupts behind.
"""
from __future__ import annotations

import mmap
import os
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvkit.devices.nvme import spec as S
from hvkit.devices.nvme.command import Command, make_command
from hvkit.devices.nvme.engine import CTRL_PAGE_SIZE, QueueEngine, read_counters, read_queue_state
from hvkit.devices.nvme.io import IoCommandSet
from hvkit.devices.nvme.namespace import Namespace
from hvkit.memory.guest import GuestMemory, MemoryRegion
from hvkit.storage.raw import RawFileBackend

native = pytest.importorskip("hvkit._nvme_native")
from hvkit.devices.nvme.accelerator import make_native_engine, native_unavailable  # noqa: E402

LOW = 2 << 20                 # RAM [0, 2 MiB) and [4 MiB, 5 MiB); a hole between
HIGH_GPA, HIGH = 4 << 20, 1 << 20
DISK = 256 * 1024
MDTS = 4096 << 5              # 128 KiB

INTERESTING = [0, 1, 2, 3, 4, 7, 8, 0xFF, 0x1000, 0xFFF, 0xFFFF, 0x10000, 0xFFFF_FFFF,
               LOW - 8, LOW - 4096, LOW - 4, LOW, LOW + 4096, HIGH_GPA, HIGH_GPA - 4096,
               HIGH_GPA + HIGH - 4096, HIGH_GPA + HIGH - 8, HIGH_GPA + HIGH, 0x10_0000,
               0x1F_F000, 0x1F_FFF8, 1 << 63, (1 << 64) - 1, (1 << 64) - 4096, (1 << 64) - 8]


class Pair:
    """One guest memory and two disks, served by both engines' command sets."""

    def __init__(self, tmp_path, read_only: bool = False) -> None:
        self.mem = GuestMemory([MemoryRegion(0, LOW, name="low"),
                                MemoryRegion(HIGH_GPA, HIGH, name="high")])
        a = RawFileBackend.create(tmp_path / "a.img", DISK)
        b = RawFileBackend.create(tmp_path / "b.img", DISK, block_size=4096)
        if read_only:
            a.close()
            a = RawFileBackend(tmp_path / "a.img", read_only=True)
        self.disks = [a, b]
        self.namespaces = {1: Namespace(1, a), 2: Namespace(2, b)}
        self.py = IoCommandSet(self.mem, self.namespaces, MDTS)
        self.page = mmap.mmap(-1, CTRL_PAGE_SIZE)
        self.nat = make_native_engine(self.mem, self.page, self.namespaces, MDTS)
        rng = random.Random(1)
        self.mem.write(0x10_0000, bytes(rng.getrandbits(8) for _ in range(64 * 1024)))

    def both(self, raw: bytes) -> tuple[int, int]:
        py_status, _dw0 = self.py.execute(Command.decode(raw))
        return py_status, self.nat.execute(raw)

    def close(self) -> None:
        del self.nat
        for d in self.disks:
            d.close()
        self.mem.close()


@pytest.fixture
def pair(tmp_path):
    p = Pair(tmp_path)
    yield p
    p.close()


def test_the_module_is_there_and_chosen_for_raw_files(pair):
    assert native_unavailable(pair.namespaces) is None

    class Guarded(RawFileBackend):
        pass

    g = Guarded(pair.disks[0].path)
    try:
        assert "no plain fd" in native_unavailable({1: Namespace(1, g)})
    finally:
        g.close()


def rw(op, nsid=1, prp1=0x10_0000, prp2=0, slba=0, nlb=1, flags=0, cdw12_extra=0):
    return make_command(op, cid=7, nsid=nsid, prp1=prp1, prp2=prp2, cdw10=slba & 0xFFFF_FFFF,
                        cdw11=slba >> 32, cdw12=((nlb - 1) & 0xFFFF) | cdw12_extra, flags=flags)


def put_list(mem, at, entries):
    mem.write(at, struct.pack(f"<{len(entries)}Q", *entries))


CASES = {
    "ok read": (rw(S.IO_READ, nlb=8), S.SUCCESS),
    "ok write": (rw(S.IO_WRITE, nlb=8, slba=16), S.SUCCESS),
    "prp1 not dword aligned": (rw(S.IO_READ, prp1=0x10_0002), S.PRP_OFFSET_INVALID),
    "prp1 mid page, two pages": (rw(S.IO_READ, prp1=0x10_0800, prp2=0x10_2000, nlb=8), S.SUCCESS),
    "prp2 with an offset": (rw(S.IO_READ, prp1=0x10_0000, prp2=0x10_2004, nlb=16),
                            S.PRP_OFFSET_INVALID),
    "prp1 outside RAM": (rw(S.IO_READ, prp1=LOW + 0x1000), S.DATA_TRANSFER_ERROR),
    "prp1 past 2^64": (rw(S.IO_READ, prp1=(1 << 64) - 512, nlb=2), S.DATA_TRANSFER_ERROR),
    "prp1 straddles the end of RAM": (rw(S.IO_READ, prp1=LOW - 512, nlb=2), S.SUCCESS),
    "prp2 in the hole": (rw(S.IO_READ, prp1=LOW - 4096, prp2=LOW, nlb=16),
                         S.DATA_TRANSFER_ERROR),
    "prp across regions": (rw(S.IO_READ, prp1=LOW - 4096, prp2=HIGH_GPA, nlb=16), S.SUCCESS),
    "list pointer misaligned": (rw(S.IO_READ, prp2=0x11_0004, nlb=24), S.PRP_OFFSET_INVALID),
    "list outside RAM": (rw(S.IO_READ, prp2=LOW + 0x8000, nlb=24), S.DATA_TRANSFER_ERROR),
    "list past 2^64": (rw(S.IO_READ, prp2=(1 << 64) - 8, nlb=24), S.DATA_TRANSFER_ERROR),
    "list's last slot chains on at the end of RAM": (
        rw(S.IO_READ, prp2=HIGH_GPA + HIGH - 8, nlb=24), None),
    "oversized transfer": (rw(S.IO_READ, nlb=MDTS // 512 + 1), S.INVALID_FIELD),
    "max transfer": (rw(S.IO_READ, prp2=0x11_0000, nlb=MDTS // 512), S.SUCCESS),
    "lba out of range": (rw(S.IO_READ, slba=DISK // 512), S.LBA_OUT_OF_RANGE),
    "lba range overflows 2^64": (rw(S.IO_READ, slba=(1 << 64) - 1, nlb=2), S.LBA_OUT_OF_RANGE),
    "last lba": (rw(S.IO_READ, slba=DISK // 512 - 1), S.SUCCESS),
    "4k namespace out of range": (rw(S.IO_READ, nsid=2, slba=DISK // 4096), S.LBA_OUT_OF_RANGE),
    "no such namespace": (rw(S.IO_READ, nsid=9), S.INVALID_NAMESPACE),
    "namespace 0": (rw(S.IO_WRITE, nsid=0), S.INVALID_NAMESPACE),
    "fused": (rw(S.IO_READ, flags=1), S.INVALID_FIELD),
    "sgl": (rw(S.IO_READ, flags=0x40), S.INVALID_FIELD),
    "unknown opcode": (make_command(0x42, nsid=1), S.INVALID_OPCODE),
    "flush": (make_command(S.IO_FLUSH, nsid=1), S.SUCCESS),
    "flush broadcast": (make_command(S.IO_FLUSH, nsid=0xFFFF_FFFF), S.SUCCESS),
    "flush bad ns": (make_command(S.IO_FLUSH, nsid=5), S.INVALID_NAMESPACE),
    "write zeroes": (make_command(S.IO_WRITE_ZEROES, nsid=1, cdw10=8, cdw12=7), S.SUCCESS),
    "write zeroes out of range": (make_command(S.IO_WRITE_ZEROES, nsid=2, cdw10=60, cdw12=7),
                                  S.LBA_OUT_OF_RANGE),
    "dsm deallocate": (make_command(S.IO_DSM, nsid=1, prp1=0x13_0000, cdw10=1,
                                    cdw11=S.DSM_ATTR_DEALLOCATE), S.SUCCESS),
    "dsm ranges outside RAM": (make_command(S.IO_DSM, nsid=1, prp1=LOW - 16, prp2=LOW, cdw10=1,
                                            cdw11=S.DSM_ATTR_DEALLOCATE), S.DATA_TRANSFER_ERROR),
    "dsm range out of range": (make_command(S.IO_DSM, nsid=1, prp1=0x13_1000, cdw10=0,
                                            cdw11=S.DSM_ATTR_DEALLOCATE), S.LBA_OUT_OF_RANGE),
    "dsm sgl": (make_command(S.IO_DSM, nsid=1, prp1=0x13_0000, flags=0x40), S.INVALID_FIELD),
}


def _lists(mem):
    # a good list at 0x11_0000 (pages 0x14_0000...), a list whose entry has an
    # offset at 0x11_1000, a list chaining to itself at 0x11_2000
    put_list(mem, 0x11_0000, [0x14_0000 + 4096 * i for i in range(40)])
    put_list(mem, 0x11_1000, [0x14_0000, 0x14_1008] + [0x14_2000] * 30)
    put_list(mem, 0x11_2ff8, [0x11_2000])
    put_list(mem, 0x12_0000, [0x20_0000 + 4096 * i for i in range(40)])   # in RAM up to LOW
    # DSM ranges: two good ones, then one past the disk
    mem.write(0x13_0000, struct.pack("<IIQIIQ", 0, 8, 0, 0, 0, 64))
    mem.write(0x13_1000, struct.pack("<IIQ", 0, 8, DISK // 512 - 4))


CASES.update({
    "list ok": (rw(S.IO_READ, prp2=0x11_0000, nlb=24), S.SUCCESS),
    "list entry with an offset": (rw(S.IO_READ, prp2=0x11_1000, nlb=24), S.PRP_OFFSET_INVALID),
    "list chains to itself": (rw(S.IO_READ, prp1=0x10_0000, prp2=0x11_2ff8, nlb=64),
                              S.INVALID_FIELD),
    "list entries outside RAM": (rw(S.IO_READ, prp2=0x12_0000, nlb=24),
                                 S.DATA_TRANSFER_ERROR),
})


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_command_statuses_match(pair, name):
    _lists(pair.mem)
    raw, expected = CASES[name]
    py, nat = pair.both(raw)
    assert nat == py, f"{name}: native {nat:#x}, Python {py:#x}"
    if expected is not None:
        assert nat == expected, f"{name}: {nat:#x}"


def test_read_only_namespace(tmp_path):
    p = Pair(tmp_path, read_only=True)
    try:
        for raw in (rw(S.IO_WRITE), make_command(S.IO_WRITE_ZEROES, nsid=1),
                    make_command(S.IO_DSM, nsid=1, prp1=0x13_0000, cdw11=S.DSM_ATTR_DEALLOCATE)):
            py, nat = p.both(raw)
            assert nat == py == S.NAMESPACE_WRITE_PROTECTED
        assert p.both(rw(S.IO_READ)) == (0, 0)
        assert p.both(make_command(S.IO_FLUSH, nsid=1)) == (0, 0)
    finally:
        p.close()


def test_data_and_counters_match(pair):
    mem = pair.mem
    payload = os.urandom(64 * 1024)
    mem.write(0x14_0000, payload)
    put_list(mem, 0x11_0000, [0x14_0000 + 4096 * i for i in range(1, 16)])
    # native writes, Python reads back, and the other way round
    assert pair.nat.execute(rw(S.IO_WRITE, prp1=0x14_0000, prp2=0x11_0000, nlb=128, slba=40)) == 0
    mem.fill(0x14_0000, 64 * 1024)
    assert pair.py.execute(Command.decode(rw(S.IO_READ, prp1=0x14_0000, prp2=0x11_0000,
                                             nlb=128, slba=40)))[0] == 0
    assert mem.read(0x14_0000, 64 * 1024) == payload
    # unaligned (dword-aligned PRP1) through the O_DIRECT bounce path
    mem.write(0x15_0004, payload[:512])
    assert pair.nat.execute(rw(S.IO_WRITE, prp1=0x15_0004, slba=3)) == 0
    mem.fill(0x15_0004, 512)
    assert pair.nat.execute(rw(S.IO_READ, prp1=0x15_0004, slba=3)) == 0
    assert mem.read(0x15_0004, 512) == payload[:512]
    with open(pair.disks[0].path, "rb") as f:
        f.seek(3 * 512)
        assert f.read(512) == payload[:512]
    # write zeroes, then a read sees zeros
    assert pair.nat.execute(make_command(S.IO_WRITE_ZEROES, nsid=1, cdw10=40, cdw12=7)) == 0
    assert pair.nat.execute(rw(S.IO_READ, prp1=0x16_0000, slba=40, nlb=8)) == 0
    assert mem.read(0x16_0000, 4096) == bytes(4096)
    st = pair.nat.stats
    assert (st["write_commands"], st["read_commands"]) == (2, 2)
    assert st["bytes_written"] == 64 * 1024 + 512
    assert st["bytes_read"] == 512 + 4096


def _field(draw, bits):
    return draw(st.one_of(st.sampled_from(INTERESTING), st.integers(0, 64),
                          st.integers(0, (1 << bits) - 1))) & ((1 << bits) - 1)


@st.composite
def commands(draw):
    opcode = draw(st.one_of(st.sampled_from([S.IO_READ, S.IO_READ, S.IO_WRITE, S.IO_FLUSH,
                                             S.IO_WRITE_ZEROES, S.IO_DSM]),
                            st.integers(0, 255)))
    return make_command(
        opcode, cid=draw(st.integers(0, 0xFFFF)),
        nsid=draw(st.sampled_from([1, 1, 2, 2, 0, 3, 0xFFFF_FFFF])),
        prp1=draw(st.one_of(st.sampled_from([0x10_0000, 0x1F_F000, HIGH_GPA + 0x1000,
                                             0x10_0004]), st.just(_field(draw, 64)))),
        prp2=draw(st.one_of(st.sampled_from([0x11_0000, 0x11_1000, 0x11_2ff8, 0x12_0000]),
                            st.just(_field(draw, 64)))),
        cdw10=_field(draw, 32), cdw11=draw(st.sampled_from([0, 0, 4, _field(draw, 32)])),
        cdw12=draw(st.one_of(st.integers(0, 300), st.just(_field(draw, 32)))),
        flags=draw(st.sampled_from([0, 0, 0, 1, 0x40, 0x80])))


@settings(max_examples=400, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.lists(commands(), min_size=1, max_size=20))
def test_random_commands_get_the_python_statuses(tmp_path_factory, cmds):
    p = Pair(tmp_path_factory.mktemp("n"))
    try:
        _lists(p.mem)
        for raw in cmds:
            py, nat = p.both(raw)
            assert nat == py, f"{Command.decode(raw)}: native {nat:#x}, Python {py:#x}"
            assert nat != S.INTERNAL_ERROR
        for d in p.disks:
            assert os.path.getsize(d.path) == DISK
    finally:
        p.close()


# -- queue-level scenarios: same memory, page and interrupts afterwards ---------------

class Irqs:
    def __init__(self, n):
        self.fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(n)]

    def counts(self):
        out = []
        for fd in self.fds:
            try:
                out.append(os.eventfd_read(fd))
            except BlockingIOError:
                out.append(0)
        return out

    def close(self):
        for fd in self.fds:
            os.close(fd)


class Side:
    """One engine on its own copy of guest memory, disk and control page."""

    def __init__(self, tmp_path, which: str) -> None:
        self.which = which
        self.mem = GuestMemory([MemoryRegion(0, LOW, name="low"),
                                MemoryRegion(HIGH_GPA, HIGH, name="high")])
        disk = RawFileBackend.create(tmp_path / f"{which}.img", DISK)
        self.disk = disk
        self.page = mmap.mmap(-1, CTRL_PAGE_SIZE)
        ns = {1: Namespace(1, disk)}
        if which == "python":
            self.vectors = [0] * 4
            io = IoCommandSet(self.mem, ns, MDTS)

            def irq(v):
                self.vectors[v] += 1
            self.e = QueueEngine(self.mem, memoryview(self.page),
                                 lambda _q, cmd: io.execute(cmd), irq)
        else:
            self.irqs = Irqs(4)
            self.e = make_native_engine(self.mem, self.page, ns, MDTS)
            self.e.set_fds(-1, -1, self.irqs.fds)

    def irq_counts(self):
        return self.vectors if self.which == "python" else self.irqs.counts()

    def close(self):
        if self.which != "python":
            self.irqs.close()
        self.e = None
        self.disk.close()
        self.mem.close()


def scenario(side: Side, seed: int, shadow: bool):
    """Hostile-ish queue traffic: bad commands, doorbells beyond the ring,
    CQ overruns, queues on missing CQs; returns what the guest can see."""
    rng = random.Random(seed)
    e, mem = side.e, side.mem
    SQ, CQ, SQ2, CQ2, SHADOW, EI = 0x1A_0000, 0x1B_0000, 0x1C_0000, 0x1D_0000, 0x1E_0000, 0x1E_1000
    mem.write(0x10_0000, bytes(range(256)) * 256)
    e.create_cq(1, CQ, 8, 1, True)
    e.create_sq(1, SQ, 16, 1)
    e.create_cq(2, CQ2, 4, 2, rng.random() < 0.5)
    e.create_sq(2, SQ2, 8, 2)
    e.create_sq(3, SQ2 + 0x1000, 8, 2)       # two SQs on one CQ
    if shadow:
        e.set_dbbuf(SHADOW, EI, initialise=True)
    tails = {1: 0, 2: 0, 3: 0}
    sizes = {1: 16, 2: 8, 3: 8}
    bases = {1: SQ, 2: SQ2, 3: SQ2 + 0x1000}
    cqheads = {1: 0, 2: 0}

    def db(qid, cq, value):
        if shadow:
            mem.write_u32(SHADOW + 4 * (2 * qid + cq), value)
        else:
            e_page = side.page
            e_page[8 * qid + 4 * cq: 8 * qid + 4 * cq + 4] = struct.pack("<I", value)

    out = []
    for step in range(40):
        for _ in range(rng.randrange(1, 6)):
            q = rng.choice([1, 1, 2, 3])
            raw = make_command(
                rng.choice([S.IO_READ, S.IO_WRITE, S.IO_FLUSH, 0x55]), cid=rng.randrange(1 << 16),
                nsid=rng.choice([1, 1, 1, 2]),
                prp1=rng.choice([0x10_0000, 0x10_0004, LOW, (1 << 64) - 4096, HIGH_GPA]),
                prp2=rng.choice([0, 0x11_0000, LOW + 8]), cdw10=rng.randrange(600),
                cdw12=rng.choice([0, 7, 15, 300, 0xFFFF]))
            mem.write(bases[q] + 64 * tails[q], raw)
            tails[q] = (tails[q] + 1) % sizes[q]
            db(q, 0, tails[q])
        if rng.random() < 0.15:
            db(rng.choice([1, 2]), 0, rng.choice([16, 17, 0xFFFF, 0xFFFF_FFFF]))   # ignored
        if rng.random() < 0.1:
            db(9, 0, 3)                                   # a queue that does not exist
        if rng.random() < 0.7:                            # the guest consumes some entries
            for c in (1, 2):
                cqheads[c] = (cqheads[c] + rng.randrange(0, 4)) % (8 if c == 1 else 4)
                db(c, 1, cqheads[c])
        out.append(e.process())
        if shadow and rng.random() < 0.3:
            e.update_event_indexes()
            out.append(e.has_work())
    return (out, mem.read(CQ, 16 * 8), mem.read(CQ2, 16 * 4), mem.read(EI, 64),
            mem.read(SHADOW, 64), [read_queue_state(memoryview(side.page), q) for q in (1, 2, 3)],
            read_counters(memoryview(side.page))["completions"], side.irq_counts())


@pytest.mark.parametrize("shadow", [False, True], ids=["mirror", "shadow"])
@pytest.mark.parametrize("seed", range(6))
def test_queue_scenarios_match(tmp_path, seed, shadow):
    sides = [Side(tmp_path, "python"), Side(tmp_path, "native")]
    try:
        py, nat = (scenario(s, seed, shadow) for s in sides)
        names = ["passes", "cq1", "cq2", "eventidx", "shadow", "queue state", "completions",
                 "irqs"]
        for name, a, b in zip(names, py, nat):
            assert a == b, f"{name} differs: Python {a!r}, native {b!r}"
    finally:
        for s in sides:
            s.close()


def test_recover_matches(tmp_path):
    """A CQ holding entries the dead process posted after its last publish."""
    results = []
    for which in ("python", "native"):
        s = Side(tmp_path, which)
        try:
            e, mem = s.e, s.mem
            e.create_cq(1, 0x1B_0000, 8, 1, True, tail=2, phase=1)
            e.create_sq(1, 0x1A_0000, 16, 1, head=3)
            for i, sqhd in ((2, 5), (3, 6)):             # two posted, unpublished entries
                mem.write(0x1B_0000 + 16 * i, struct.pack("<IIHHI", 0, 0, sqhd, 1, 1 << 16 | i))
            e.recover()
            e.flush_interrupts()
            results.append(([read_queue_state(memoryview(s.page), 1)], s.irq_counts()))
        finally:
            s.close()
    assert results[0] == results[1]
    assert results[1][0] == [(6, 4, 1)]


def test_coalescing_matches(tmp_path):
    results = []
    for which in ("python", "native"):
        s = Side(tmp_path, which)
        try:
            e, mem = s.e, s.mem
            if which == "python":
                e.coalesce_threshold = 3
                e.coalesce_disabled_vectors = {2}
            else:
                e.set_coalescing(3, [2])
            e.create_cq(1, 0x1B_0000, 64, 1, True)
            e.create_sq(1, 0x1A_0000, 64, 1)
            e.create_cq(2, 0x1D_0000, 64, 2, True)
            e.create_sq(2, 0x1C_0000, 64, 2)
            for q, base in ((1, 0x1A_0000), (2, 0x1C_0000)):
                for i in range(10):
                    mem.write(base + 64 * i, make_command(S.IO_FLUSH, cid=i, nsid=1))
                s.page[8 * q:8 * q + 4] = struct.pack("<I", 10)
            results.append((e.process(budget=7), e.process(), s.irq_counts()))
        finally:
            s.close()
    assert results[0] == results[1]


def test_a_batch_runs_through_io_uring_and_completes_in_order(tmp_path):
    """32 writes then 32 reads fetched in one pass each: their I/O runs
    together (io_uring), their completions come in fetch order with the
    SQ head of each command, the data is where it belongs."""
    s = Side(tmp_path, "native")
    try:
        e, mem = s.e, s.mem
        if not e.uring:
            pytest.skip("no io_uring here")
        e.create_cq(1, 0x1B_0000, 64, 1, True)
        e.create_sq(1, 0x1A_0000, 64, 1)
        pages = [os.urandom(4096) for _ in range(32)]
        for i, data in enumerate(pages):
            mem.write(0x10_0000 + 4096 * i, data)
            mem.write(0x1A_0000 + 64 * i, make_command(
                S.IO_WRITE, cid=i, nsid=1, prp1=0x10_0000 + 4096 * i, cdw10=8 * (31 - i),
                cdw12=7))
        s.page[8:12] = struct.pack("<I", 32)
        assert e.process() == 32
        assert e.batches == (1, 32)
        mem.fill(0x10_0000, 32 * 4096)
        for i in range(32):
            mem.write(0x1A_0000 + 64 * (32 + i), make_command(
                S.IO_READ, cid=100 + i, nsid=1, prp1=0x10_0000 + 4096 * i, cdw10=8 * (31 - i),
                cdw12=7))
        s.page[8:12] = struct.pack("<I", 0)
        s.page[12:16] = struct.pack("<I", 32)            # the host consumed the writes
        assert e.process() == 32
        assert e.batches == (2, 64)
        for i in range(64):
            dw0, _r, sqhd, sqid, dw3 = struct.unpack("<IIHHI", mem.read(0x1B_0000 + 16 * i, 16))
            cid = i if i < 32 else 100 + i - 32
            assert (sqid, sqhd, dw3 & 0xFFFF, dw3 >> 17) == (1, (i + 1) % 64, cid, 0)
        for i, data in enumerate(pages):
            assert mem.read(0x10_0000 + 4096 * i, 4096) == data
        with open(s.disk.path, "rb") as f:
            for i, data in enumerate(pages):
                f.seek(4096 * (31 - i))
                assert f.read(4096) == data
        assert read_queue_state(memoryview(s.page), 1) == (0, 0, 0)
        assert s.irq_counts()[1] == 2
    finally:
        s.close()


# -- fuzz findings -------------------------------------------------------------------

def test_a_write_to_the_last_lbas_keeps_the_image_size(tmp_path):
    """A 4 KiB O_DIRECT alignment, 512-byte LBAs and an image whose size is
    not a 4 KiB multiple: the bounce buffer's read-modify-write of the last
    block must not grow the file (the namespace would grow on next open)."""
    path = tmp_path / "odd.img"
    size = 16 * 4096 + 1536
    path.write_bytes(bytes(size) + b"T" * 100)       # 100 bytes that are not the disk's
    mem = GuestMemory([MemoryRegion(0, LOW, name="low")])
    page = mmap.mmap(-1, CTRL_PAGE_SIZE)
    fd = os.open(path, os.O_RDWR)
    try:
        eng = native.NativeEngine(page, MDTS)
        eng.add_region(0, LOW, mem.region_of(0).mapping)
        eng.add_namespace(1, fd, 9, size, False, 4096)
        data = os.urandom(2048)
        mem.write(0x10_0000, data)
        last = size // 512 - 4
        assert eng.execute(rw(S.IO_WRITE, slba=last, nlb=4)) == S.SUCCESS
        assert os.fstat(fd).st_size == size + 100
        raw = path.read_bytes()
        assert raw[size - 2048:size] == data
        assert raw[size:] == b"T" * 100
        mem.fill(0x10_0000, 2048)
        assert eng.execute(rw(S.IO_READ, slba=last, nlb=4)) == S.SUCCESS
        assert mem.read(0x10_0000, 2048) == data
        del eng
    finally:
        os.close(fd)
        mem.close()


@pytest.mark.parametrize("which", ["python", "native"])
def test_recovery_ignores_an_entry_the_guest_forged(tmp_path, which):
    """After a restart, an entry at the CQ tail with the current phase that
    names no SQ of this CQ (or an SQ head past the ring) was not posted by
    the dead process: the CQ tail and SQ heads stay where they were."""
    s = Side(tmp_path, which)
    try:
        e, mem = s.e, s.mem
        e.create_cq(1, 0x1B_0000, 8, 1, True, tail=2, phase=1)
        e.create_sq(1, 0x1A_0000, 16, 1, head=3)
        for forged in ((999, 9), (999, 1), (5, 7)):      # (sqhd, sqid)
            mem.write(0x1B_0000 + 32, struct.pack("<IIHHI", 0, 0, *forged, 1 << 16 | 77))
            e.recover()
            assert read_queue_state(memoryview(s.page), 1) == (3, 2, 1), forged
    finally:
        s.close()


@pytest.mark.parametrize("which", ["python", "native"])
def test_queue_positions_past_the_ring_are_refused(tmp_path, which):
    """A CQ tail or SQ head >= the queue size would defeat the wrap and
    walk completions off the end of the ring."""
    s = Side(tmp_path, which)
    try:
        e = s.e
        with pytest.raises(ValueError):
            e.create_cq(1, 0x1B_0000, 8, 1, True, tail=8, phase=1)
        e.create_cq(1, 0x1B_0000, 8, 1, True, tail=7, phase=1)
        with pytest.raises(ValueError):
            e.create_sq(1, 0x1A_0000, 16, 1, head=16)
        with pytest.raises(ValueError):
            e.create_sq(1, 0x1A_0000, 16, 1, head=0xFFFF_FFFF)
        e.create_sq(1, 0x1A_0000, 16, 1, head=15)
    finally:
        s.close()


def test_write_zeroes_without_fallocate_from_many_engines(tmp_path):
    """Write Zeroes where fallocate is refused (a character device) writes
    from a zero buffer; engines on several threads at once all succeed."""
    import threading
    fd = os.open("/dev/null", os.O_RDWR)
    mem = GuestMemory([MemoryRegion(0, LOW, name="low")])
    results = []

    def one():
        page = mmap.mmap(-1, CTRL_PAGE_SIZE)
        eng = native.NativeEngine(page, MDTS)
        eng.add_region(0, LOW, mem.region_of(0).mapping)
        eng.add_namespace(1, fd, 9, 64 << 20, False, 1)
        results.extend(eng.execute(rw(S.IO_WRITE_ZEROES, slba=0, nlb=0x10000)) for _ in range(8))

    try:
        threads = [threading.Thread(target=one) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [S.SUCCESS] * 32
    finally:
        os.close(fd)
        mem.close()


# -- the run loop's pipeline -------------------------------------------------------------

class Pumped:
    """The native engine driven as its run loop drives it: ``pump`` steps,
    then ``drain``; the guest-visible results must be process()'s."""

    def __init__(self, e):
        self.e = e

    def __getattr__(self, name):
        return getattr(self.e, name)

    def process(self, budget=None):
        self.e.pump(budget)
        self.e.pump(budget)
        self.e.drain()
        return None


@pytest.mark.parametrize("shadow", [False, True], ids=["mirror", "shadow"])
@pytest.mark.parametrize("seed", range(6))
def test_pipeline_leaves_what_process_leaves(tmp_path, seed, shadow):
    sides = [Side(tmp_path, "python"), Side(tmp_path, "native")]
    try:
        sides[1].e = Pumped(sides[1].e)
        py, nat = (scenario(s, seed, shadow) for s in sides)
        names = ["passes", "cq1", "cq2", "eventidx", "shadow", "queue state", "completions"]
        for name, a, b in list(zip(names, py, nat))[1:]:
            assert a == b, f"{name} differs: Python {a!r}, native {b!r}"
    finally:
        for s in sides:
            s.close()


def test_pipeline_keeps_io_in_flight_and_posts_in_fetch_order(tmp_path):
    """Reads and writes start as they are fetched and complete in fetch
    order with each command's SQ head; a flush among them waits for the
    writes before it; the data is where it belongs."""
    s = Side(tmp_path, "native")
    try:
        e, mem = s.e, s.mem
        if not e.uring:
            pytest.skip("no io_uring here")
        e.create_cq(1, 0x1B_0000, 64, 1, True)
        e.create_sq(1, 0x1A_0000, 64, 1)
        pages = [os.urandom(4096) for _ in range(40)]
        for i, data in enumerate(pages):
            mem.write(0x10_0000 + 4096 * i, data)
            op = S.IO_FLUSH if i == 20 else S.IO_WRITE
            mem.write(0x1A_0000 + 64 * i, make_command(
                op, cid=i, nsid=1, prp1=0x10_0000 + 4096 * i, cdw10=8 * (39 - i), cdw12=7))
        s.page[8:12] = struct.pack("<I", 40)
        e.pump()
        for _ in range(10000):
            if not e.inflight:
                break
            e.pump()
        e.drain()
        assert e.inflight == 0
        for i in range(40):
            dw0, _r, sqhd, sqid, dw3 = struct.unpack("<IIHHI", mem.read(0x1B_0000 + 16 * i, 16))
            assert (sqid, sqhd, dw3 & 0xFFFF, (dw3 >> 16) & 1, dw3 >> 17) == (1, i + 1, i, 1, 0)
        assert read_queue_state(memoryview(s.page), 1) == (40, 40, 1)
        with open(s.disk.path, "rb") as f:
            for i, data in enumerate(pages):
                if i != 20:
                    f.seek(4096 * (39 - i))
                    assert f.read(4096) == data
    finally:
        s.close()
