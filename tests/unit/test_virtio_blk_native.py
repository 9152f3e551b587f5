"""virtio-blk's C engine (native/virtio/blk_engine.c, blk_native.py): it
answers exactly as the Python device does, whatever the guest put in the
rings, and as a device it serves, hands its positions back on stop, and
asks for a reset when the ring is corrupt.
"""
from __future__ import annotations

import os
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvkit.devices.virtio import spec as V
from hvkit.devices.virtio.blk import S_IOERR, S_OK, S_UNSUPP, SECTOR, VirtioBlk
from hvkit.devices.virtio.driver import MmioDriver, wait_for
from hvkit.devices.virtio.mmio import VirtioMmioTransport
from hvkit.errors import ConfigError
from hvkit.memory.guest import GuestMemory, MemoryRegion
from hvkit.storage.raw import RawFileBackend

native = pytest.importorskip("hvkit._virtio_native",
                             reason="the hvkit._virtio_native extension is not built")

MEM = 256 << 10
DISK = 64 << 10                     # 128 sectors
RINGS = 0x10000                     # the driver's allocator starts here
HDRS = 0x20000                      # request headers the descriptors may point at
SEGS = 0x20400                      # discard / write-zeroes segments
DATA = 0x21000                      # data buffers
TABLE = 0x30000                     # a table for indirect descriptors
SPLIT = 0x22000                     # where RAM splits in two, in the data area
STATUS = 0x20200                    # status bytes
QSIZE = 16
USED_FLAGS_AND_EVENT = 2            # bytes of the used ring the two may write differently

addresses = st.one_of(
    st.sampled_from([HDRS + 16 * k for k in range(8)]),
    st.sampled_from([SEGS + 16 * k for k in range(4)]),
    st.integers(DATA, DATA + 0x2000).map(lambda a: a - a % 8),
    st.sampled_from([0, TABLE, MEM - 1, MEM - 16, MEM, 2 ** 63, 2 ** 64 - 1]),
    st.integers(0, 2 ** 64 - 1))
lengths = st.one_of(st.sampled_from([1, 16, 17, 32, 512, 513, 1024, 4096]),
                    st.integers(0, 600), st.integers(0, 2 ** 32 - 1))
desc_flags = st.one_of(st.sampled_from([V.DESC_F_NEXT, V.DESC_F_NEXT | V.DESC_F_WRITE,
                                        V.DESC_F_WRITE, 0, V.DESC_F_INDIRECT]),
                       st.integers(0, 0xFFFF))
descriptor = st.tuples(addresses, lengths, desc_flags, st.integers(0, QSIZE + 1))
rtypes = st.one_of(st.sampled_from([0, 1, 4, 8, 11, 13]), st.integers(0, 2 ** 32 - 1))
sectors = st.one_of(st.integers(0, DISK // SECTOR + 2), st.integers(0, 2 ** 64 - 1))
segment = st.tuples(sectors, st.one_of(st.integers(0, 8), st.integers(0, 2 ** 32 - 1)),
                    st.one_of(st.integers(0, 1), st.integers(0, 2 ** 32 - 1)))


data_len = st.one_of(st.sampled_from([512, 1024, 4096, 20, 0]), st.integers(0, 5000))


@st.composite
def request_chain(draw):
    """(header slot, type, sector, descriptors): what a driver sends,
    mostly well formed, with chosen flaws."""
    k = draw(st.integers(0, 7))
    rtype = draw(st.one_of(st.sampled_from([0, 0, 0, 1, 1, 1, 4, 8, 11, 13]), rtypes))
    sector = draw(st.one_of(st.integers(0, DISK // SECTOR - 8), sectors))
    hdr_len = draw(st.sampled_from([16, 16, 16, 16, 12, 32]))
    n = draw(st.one_of(st.sampled_from([512, 1024, 4096, 20]), data_len))
    device_writes = draw(st.one_of(st.just(rtype in (0, 8)), st.booleans()))
    data_at = DATA + draw(st.integers(0, 0x1800)) // 512 * 512
    status_at = STATUS + draw(st.integers(0, 0xFF))
    descs = [(HDRS + 16 * k, hdr_len, V.DESC_F_NEXT)]
    if rtype in (11, 13) and draw(st.booleans()):
        descs.append((SEGS, 16 * draw(st.integers(1, 4)), V.DESC_F_NEXT))
    elif n and rtype != 4:
        descs.append((data_at, n, V.DESC_F_NEXT | (V.DESC_F_WRITE if device_writes else 0)))
    descs.append((status_at, draw(st.sampled_from([1, 1, 1, 1, 0, 2])), V.DESC_F_WRITE))
    return k, rtype, sector, descs


@st.composite
def guest_rings(draw):
    table = [(0, 0, 0, 0)] * QSIZE
    heads, free = [], list(range(QSIZE))
    headers = draw(st.lists(st.tuples(rtypes, sectors), min_size=8, max_size=8))
    for k, rtype, sector, chain in draw(st.lists(request_chain(), min_size=1, max_size=5)):
        headers[k] = (rtype, sector)
        if len(chain) > len(free):
            break
        idx = [free.pop(0) for _ in chain]
        for i, (a, n, f) in enumerate(chain):
            table[idx[i]] = (a, n, f, idx[i + 1] if i + 1 < len(chain) else 0)
        heads.append(idx[0])
    # flaws a hostile guest adds: any descriptor rewritten, stray heads
    for i, d in draw(st.lists(st.tuples(st.integers(0, QSIZE - 1), descriptor), max_size=3)):
        table[i] = d
    heads += draw(st.lists(st.integers(0, QSIZE + 1), max_size=2))
    advance = draw(st.one_of(st.just(len(heads)), st.integers(0, len(heads)),
                             st.integers(0, 0xFFFF)))
    return {
        "table": table,
        "indirect": draw(st.lists(descriptor, min_size=0, max_size=6)),
        "headers": headers,
        "segments": draw(st.lists(segment, min_size=4, max_size=4)),
        "heads": heads,
        "advance": advance,
        "data": draw(st.binary(min_size=0, max_size=0x200)),
        "used_event": draw(st.integers(0, 0xFFFF)),
        "avail_flags": draw(st.integers(0, 1)),
    }


def plant(mem: GuestMemory, dq, g) -> None:
    """Write what a guest could into the rings and buffers."""
    mem.write(DATA, g["data"])
    for k, (rtype, sector) in enumerate(g["headers"]):
        mem.write(HDRS + 16 * k, struct.pack("<IIQ", rtype, 0, sector))
    for k, (sector, n, fl) in enumerate(g["segments"]):
        mem.write(SEGS + 16 * k, struct.pack("<QII", sector, n, fl))
    for i, (a, n, f, nxt) in enumerate(g["table"]):
        dq.raw_descriptor(i, a, n, f, nxt)
    for i, (a, n, f, nxt) in enumerate(g["indirect"]):
        dq.raw_descriptor(i, a, n, f, nxt, table=TABLE)
    for i, head in enumerate(g["heads"]):
        mem.write_u16(dq.avail + 4 + 2 * ((dq.avail_idx + i) % dq.size), head)
    dq.set_used_event(g["used_event"])
    mem.write_u16(dq.avail, g["avail_flags"])
    dq.set_avail_idx(dq.avail_idx + g["advance"])


def make_disk(path: str, content: bytes) -> RawFileBackend:
    with open(path, "wb") as f:
        f.write(content)
    return RawFileBackend(path, direct=False)


#: guest RAM as one region, two adjacent ones (data buffers cross the
#: boundary) or two with a hole in the data area
LAYOUTS = {"one": [(0, MEM)],
           "adjacent": [(0, SPLIT), (SPLIT, MEM - SPLIT)],
           "hole": [(0, SPLIT), (SPLIT + 0x1000, MEM - SPLIT - 0x1000)]}


def guest_ram(layout: str) -> GuestMemory:
    return GuestMemory([MemoryRegion(gpa, size, name=f"ram@{gpa:#x}")
                        for gpa, size in LAYOUTS[layout]])


def python_side(tmp_path, content, features, name, layout="one"):
    """A device and driver over fresh RAM and a disk holding ``content``
    (the C side uses only the rings the driver set up through it)."""
    mem = guest_ram(layout)
    be = make_disk(str(tmp_path / f"{name}.img"), content)
    dev = VirtioBlk(mem, be, threaded=False, engine="python", serial="agree")
    drv = MmioDriver(VirtioMmioTransport(dev), mem, alloc_base=RINGS, alloc_end=HDRS)
    drv.setup(features=features, queue_sizes={0: QSIZE})
    return mem, be, dev, drv


def engine_for(dev: VirtioBlk, be: RawFileBackend, mem: GuestMemory, fd: int):
    eng = native.BlkEngine(fd, be.size, dev.read_only, 1, serial=dev.serial,
                           max_segments=dev.max_segments,
                           max_discard_sectors=dev.max_discard_sectors)
    for region in mem:
        eng.add_region(region.gpa, region.size, region.mapping)
    q = dev.queues[0]
    eng.set_queue(q.size, q.desc_addr, q.driver_addr, q.device_addr, *q.positions(),
                  q.event_idx, q.indirect)
    return eng


def without_used_flags(mem: GuestMemory, dq) -> bytes:
    """Guest RAM but the used ring's flags and avail_event (where the two
    engines ask for notifications differently: the C one as it polls)."""
    raw = bytearray(b"".join(bytes(r.mapping[:r.size]) for r in mem))
    raw[dq.used:dq.used + USED_FLAGS_AND_EVENT] = b"\0\0"
    ev = dq.used + 4 + 8 * dq.size
    raw[ev:ev + 2] = b"\0\0"
    return bytes(raw)


AGREE = settings(max_examples=200, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture,
                                        HealthCheck.too_slow])


@given(g=guest_rings(), event_idx=st.booleans(), indirect=st.booleans(),
       read_only=st.booleans(), disk_seed=st.integers(0, 2 ** 32),
       layout=st.sampled_from(sorted(LAYOUTS)))
@AGREE
def test_c_and_python_engines_agree_on_random_rings(tmp_path, g, event_idx, indirect,
                                                   read_only, disk_seed, layout):
    content = random.Random(disk_seed).randbytes(DISK)
    features = ((1 << V.F_EVENT_IDX) if event_idx else 0) \
        | ((1 << V.F_INDIRECT_DESC) if indirect else 0)
    # the same rings, buffers and disk twice: A served by Python, B by C
    mem_a, be_a, dev_a, drv_a = python_side(tmp_path, content, features, "python", layout)
    mem_b, be_b, dev_b, drv_b = python_side(tmp_path, content, features, "c", layout)
    fd = os.open(be_b.path, os.O_RDWR)
    try:
        if read_only:
            dev_a.read_only = dev_b.read_only = True
        plant(mem_a, drv_a.queues[0], g)
        plant(mem_b, drv_b.queues[0], g)
        assert without_used_flags(mem_a, drv_a.queues[0]) == \
            without_used_flags(mem_b, drv_b.queues[0])
        eng = engine_for(dev_b, be_b, mem_b, fd)

        drv_a.kick(0)                          # Python serves A
        n = eng.process()                      # C serves B

        broken_a = bool(dev_a.status & V.STATUS_DEVICE_NEEDS_RESET)
        assert (n < 0) == broken_a
        q = dev_a.queues[0]
        assert eng.positions[:2] == q.positions()[:2]
        assert without_used_flags(mem_a, drv_a.queues[0]) == \
            without_used_flags(mem_b, drv_b.queues[0])
        with open(be_a.path, "rb") as fa, open(be_b.path, "rb") as fb:
            assert fa.read() == fb.read()
        st_ = eng.stats
        assert (st_["ok"], st_["ioerr"], st_["unsupp"]) == \
            (dev_a.completed[S_OK], dev_a.completed[S_IOERR], dev_a.completed[S_UNSUPP])
        assert st_["chain_errors"] == q.errors
        if not broken_a:
            raised = bool(drv_a.interrupt_status() & V.INT_VRING)
            assert raised == (st_["interrupts"] > 0)
    finally:
        os.close(fd)
        for dev, be, mem in ((dev_a, be_a, mem_a), (dev_b, be_b, mem_b)):
            dev.close()
            be.close()
            mem.close()


# -- the engine as the device's queue server ------------------------------------------------

@pytest.fixture
def native_blk(tmp_path):
    mem = GuestMemory.create(1 << 20)
    path = str(tmp_path / "disk.img")
    be = make_disk(path, bytes(DISK))
    dev = VirtioBlk(mem, be, engine="native", serial="native")
    t = VirtioMmioTransport(dev)
    drv = MmioDriver(t, mem)
    yield mem, be, dev, drv
    dev.close()
    be.close()
    mem.close()


def request(q, rtype: int, sector: int, data: bytes = b"", in_len: int = 0) -> int:
    hdr = struct.pack("<IIQ", rtype, 0, sector)
    out = [hdr, data] if data else [hdr]
    return q.add(out, [in_len + 1] if in_len else [1])


def test_native_device_writes_and_reads_back(native_blk):
    mem, be, dev, drv = native_blk
    drv.setup()
    assert dev.native is not None and dev.native.running
    q = drv.queues[0]
    pages = {s: os.urandom(4096) for s in (0, 8, 64, 120)}
    heads = [request(q, 1, s, data) for s, data in pages.items()]
    drv.kick(0)
    got = q.wait(len(heads))
    assert sorted(h for h, _, _ in got) == sorted(heads)
    assert all(w == bytes([S_OK]) for _, _, w in got)
    with open(be.path, "rb") as f:
        disk = f.read()
    for s, data in pages.items():
        assert disk[s * SECTOR:s * SECTOR + 4096] == data
    reads = {request(q, 0, s, in_len=4096): s for s in pages}
    drv.kick(0)
    for head, length, written in q.wait(len(reads)):
        assert length == 4097
        assert written[:4096] == pages[reads[head]] and written[4096] == S_OK
    # out of range, unsupported: the same answers as the Python device
    bad = request(q, 0, DISK // SECTOR, in_len=512)
    odd = request(q, 99, 0, in_len=0)
    drv.kick(0)
    answers = {h: w for h, _, w in q.wait(2)}
    assert answers[bad][-1] == S_IOERR and answers[odd] == bytes([S_UNSUPP])


def test_stop_hands_the_positions_back_for_a_snapshot(native_blk):
    mem, be, dev, drv = native_blk
    drv.setup()
    q = drv.queues[0]
    for i in range(5):
        request(q, 1, i * 8, os.urandom(4096))
    drv.kick(0)
    q.wait(5)
    state = dev.state()                        # the engine stops, answers, restarts
    assert dev.native.running
    qs = state["queues"][0]
    assert (qs["last_avail"], qs["used_idx"]) == (5, 5)
    dev.pause()
    assert not dev.native.running
    assert dev.queues[0].positions()[:2] == (5, 5)
    dev.resume()
    assert dev.native.running
    request(q, 4, 0)
    drv.kick(0)
    assert q.wait(1)[0][2] == bytes([S_OK])
    assert dev.completed[S_OK] >= 5


def test_a_corrupt_avail_index_makes_the_device_ask_for_a_reset(native_blk):
    mem, be, dev, drv = native_blk
    drv.setup()
    q = drv.queues[0]
    q.set_avail_idx(q.size + 5)
    drv.kick(0)
    wait_for(lambda: dev.status & V.STATUS_DEVICE_NEEDS_RESET)
    assert not dev.native.running
    assert "corrupt" in dev.reset_reason
    drv.setup()                                # a reset brings it back
    assert dev.native.running
    request(drv.queues[0], 4, 0)
    drv.kick(0)
    assert drv.queues[0].wait(1)[0][2] == bytes([S_OK])


def test_many_requests_in_flight_through_io_uring(native_blk):
    mem, be, dev, drv = native_blk
    drv.setup()
    q = drv.queues[0]
    pages = {s: os.urandom(4096) for s in range(0, DISK // SECTOR, 8)}
    heads = [request(q, 1, s, data) for s, data in pages.items()]
    drv.kick(0)
    q.wait(len(heads))
    reads = {request(q, 0, s, in_len=4096): s for s in pages}
    drv.kick(0)
    for head, _, written in q.wait(len(reads)):
        assert written[:4096] == pages[reads[head]] and written[4096] == S_OK
    dev.pause()
    assert dev.native.run_stats["requests"] >= 2 * len(pages)
    dev.resume()


def test_native_engine_refused_for_other_backends(tmp_path):
    class Other(RawFileBackend):
        pass

    mem = GuestMemory.create(1 << 20)
    path = str(tmp_path / "d.img")
    make_disk(path, bytes(DISK)).close()
    be = Other(path, direct=False)
    try:
        with pytest.raises(ConfigError, match="not a plain file"):
            VirtioBlk(mem, be, engine="native")
        dev = VirtioBlk(mem, be)                # auto: the Python engine
        assert dev.native is None
        dev.close()
    finally:
        be.close()
        mem.close()


@given(g=guest_rings(), event_idx=st.booleans(), indirect=st.booleans())
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_hostile_rings_against_the_running_engine(tmp_path, g, event_idx, indirect):
    """The engine's own loop (io_uring, many requests in flight) on random
    rings: every chain made available is answered, or the device asks for
    a reset; nothing else happens to the VMM."""
    features = ((1 << V.F_EVENT_IDX) if event_idx else 0) \
        | ((1 << V.F_INDIRECT_DESC) if indirect else 0)
    mem = GuestMemory.create(MEM)
    be = make_disk(str(tmp_path / "run.img"), bytes(DISK))
    dev = VirtioBlk(mem, be, engine="native", serial="run")
    drv = MmioDriver(VirtioMmioTransport(dev), mem, alloc_base=RINGS, alloc_end=HDRS)
    try:
        drv.setup(features=features, queue_sizes={0: QSIZE})
        assert dev.native.running
        dq = drv.queues[0]
        plant(mem, dq, g)
        drv.kick(0)
        want = g["advance"] & 0xFFFF
        wait_for(lambda: dev.status & V.STATUS_DEVICE_NEEDS_RESET
                 or (want <= QSIZE and dq.used_idx() == want), timeout=10)
        if not dev.status & V.STATUS_DEVICE_NEEDS_RESET:
            for slot in range(want):
                head, _ = struct.unpack("<II", mem.read(dq.used + 4 + 8 * slot, 8))
                assert head < QSIZE
        dev.pause()                            # positions back in the Virtqueue
        if not dev.status & V.STATUS_DEVICE_NEEDS_RESET:
            assert dev.queues[0].positions()[:2] == (want, want)
    finally:
        dev.close()
        be.close()
        mem.close()


def test_engine_that_cannot_start_leaves_the_queue_to_python(tmp_path):
    """The engine opens the disk's file again; if that fails (here the file
    was unlinked after the backend opened it) the Python engine serves."""
    mem = GuestMemory.create(1 << 20)
    path = str(tmp_path / "gone.img")
    be = make_disk(path, bytes(DISK))
    os.unlink(path)
    dev = VirtioBlk(mem, be, engine="native")
    drv = MmioDriver(VirtioMmioTransport(dev), mem)
    try:
        drv.setup()
        assert not dev.native.running
        q = drv.queues[0]
        data = os.urandom(4096)
        request(q, 1, 8, data)
        drv.kick(0)
        assert q.wait(1)[0][2] == bytes([S_OK])
        request(q, 0, 8, in_len=4096)
        drv.kick(0)
        assert q.wait(1)[0][2] == data + bytes([S_OK])
        assert not dev.status & V.STATUS_DEVICE_NEEDS_RESET
    finally:
        dev.close()
        be.close()
        mem.close()


@pytest.mark.parametrize("event_idx", [True, False])
def test_idle_engine_asks_for_the_next_notification(native_blk, event_idx):
    """Once the engine stops polling it must hear of the next request:
    avail_event at the driver's index (EVENT_IDX) or NO_NOTIFY cleared;
    a request then kicked is served."""
    mem, be, dev, drv = native_blk
    features = None if event_idx else dev.avail_features & ~(1 << V.F_EVENT_IDX)
    drv.setup(features=features)
    q = drv.queues[0]
    for i in range(3):
        request(q, 1, i * 8, os.urandom(512))
        drv.kick(0)
        q.wait(1)
        if event_idx:
            wait_for(lambda: q.avail_event() == q.avail_idx)
        else:
            wait_for(lambda: not q.used_flags() & V.USED_F_NO_NOTIFY)
    assert dev.completed[S_OK] == 3


def test_pages_the_engine_wrote_count_as_host_writes(native_blk):
    """KVM's dirty log misses what the engine writes into guest RAM: once
    it stops, those pages are in the memory's record of host writes, so a
    diff snapshot saves the data it read, the statuses and the used ring."""
    mem, be, dev, drv = native_blk
    drv.setup()
    q = drv.queues[0]
    request(q, 1, 0, os.urandom(4096))
    drv.kick(0)
    q.wait(1)
    mem.track_writes()
    head = request(q, 0, 0, in_len=4096)
    _, writable = q.inflight[head]
    drv.kick(0)
    q.wait(1)
    dev.pause()
    written = mem.take_written()
    dev.resume()
    buf, _n = writable[0]
    assert {buf // 4096, (buf + 4095) // 4096} <= written      # the data read
    assert (buf + 4096) // 4096 in written                      # its status byte
    assert q.used // 4096 in written                            # the used ring


def test_requests_of_many_segments(native_blk):
    """Linux sends up to seg_max segments in one request: 100 of 512 bytes
    written and read back through the engine's ring."""
    mem, be, dev, drv = native_blk
    drv.setup(queue_sizes={0: 256})
    q = drv.queues[0]
    data = os.urandom(100 * 512)
    hdr = struct.pack("<IIQ", 1, 0, 16)
    q.add([hdr] + [data[i:i + 512] for i in range(0, len(data), 512)], [1])
    drv.kick(0)
    assert q.wait(1)[0][2] == bytes([S_OK])
    head = q.add([struct.pack("<IIQ", 0, 0, 16)], [512] * 100 + [1])
    drv.kick(0)
    (got_head, length, written), = q.wait(1)
    assert got_head == head and length == len(data) + 1
    assert written == data + bytes([S_OK])
    with open(be.path, "rb") as f:
        f.seek(16 * SECTOR)
        assert f.read(len(data)) == data
