"""Hostile guests: random descriptor tables, rings and requests against the
queue and every device. The VMM may refuse (ChainError, QueueBroken,
NEEDS_RESET, an error status) but never raises anything else, never loops,
and never touches memory outside guest RAM (backends assert their ranges).
"""
from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvkit.devices.virtio import spec as V
from hvkit.devices.virtio.blk import VirtioBlk
from hvkit.devices.virtio.chain import ChainError, QueueBroken
from hvkit.devices.virtio.console import VirtioConsole
from hvkit.devices.virtio.driver import Allocator, DriverQueue, MmioDriver, PciDriver
from hvkit.devices.virtio.mmio import VirtioMmioTransport
from hvkit.devices.virtio.net import VirtioNet
from hvkit.devices.virtio.pci import VirtioPciTransport
from hvkit.devices.virtio.queue import Virtqueue
from hvkit.devices.virtio.rng import VirtioRng
from hvkit.devices.virtio.vsock import HDR, VirtioVsock
from hvkit.memory.guest import GuestMemory

MEM = 256 << 10
DATA = 0x20000          # random bytes the descriptors may point at
TABLE = 0x30000         # a second descriptor table for indirect descriptors
EXAMPLES = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])

addresses = st.one_of(
    st.integers(DATA, DATA + 0x1000),
    st.sampled_from([0, TABLE, TABLE + 16, MEM - 16, MEM - 1, MEM, 2 ** 63, 2 ** 64 - 1]),
    st.integers(0, 2 ** 64 - 1))
lengths = st.one_of(st.integers(0, 80), st.sampled_from([16, 44, 512, 4096, 0x10000]),
                    st.integers(0, 2 ** 32 - 1))
flags = st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF))
descriptor = st.tuples(addresses, lengths, flags, st.integers(0, 20))


@st.composite
def hostile(draw, size):
    return {
        "table": draw(st.lists(descriptor, min_size=size, max_size=size)),
        "indirect": draw(st.lists(descriptor, min_size=0, max_size=8)),
        "heads": draw(st.lists(st.integers(0, size + 2), min_size=1, max_size=size + 2)),
        "advance": draw(st.one_of(st.integers(0, size), st.integers(0, 0xFFFF))),
        "data": draw(st.binary(min_size=0, max_size=0x1000)),
        "used_event": draw(st.integers(0, 0xFFFF)),
        "avail_flags": draw(st.integers(0, 0xFFFF)),
    }


def plant(mem, dq: DriverQueue, h) -> None:
    """Write the hostile ring content the way a guest could."""
    mem.write(DATA, h["data"])
    for i, (a, n, f, nxt) in enumerate(h["table"]):
        dq.raw_descriptor(i, a, n, f, nxt)
    for i, (a, n, f, nxt) in enumerate(h["indirect"]):
        dq.raw_descriptor(i, a, n, f, nxt, table=TABLE)
    for i, head in enumerate(h["heads"]):
        mem.write_u16(dq.avail + 4 + 2 * ((dq.avail_idx + i) % dq.size), head & 0xFFFF)
    dq.set_used_event(h["used_event"])
    mem.write_u16(dq.avail, h["avail_flags"])
    dq.set_avail_idx(dq.avail_idx + h["advance"])


@pytest.fixture(scope="module")
def mem():
    m = GuestMemory.create(MEM)
    yield m
    m.close()


@given(h=hostile(8), event_idx=st.booleans(), indirect=st.booleans())
@EXAMPLES
def test_queue_survives_anything(mem, h, event_idx, indirect):
    mem.fill(0, MEM)
    dq = DriverQueue(mem, Allocator(0x1000, DATA), 0, 8)
    vq = Virtqueue(mem, 0, 8)
    vq.desc_addr, vq.driver_addr, vq.device_addr = dq.desc, dq.avail, dq.used
    vq.event_idx, vq.indirect = event_idx, indirect
    vq.enable()
    plant(mem, dq, h)
    for _ in range(3 * 8):
        try:
            chain = vq.pop()
        except ChainError as exc:
            assert exc.head is not None and 0 <= exc.head < 8
            vq.push(exc.head, 0)
            continue
        except QueueBroken:
            assert vq.broken
            break
        if chain is None:
            break
        assert 0 <= chain.head < 8
        for view in chain.readable + chain.writable:
            assert view.obj is mem.regions[0].mapping      # a view of guest RAM itself
        assert chain.read_len + chain.write_len <= 9 * 2 ** 32
        w = chain.writer()
        w.write(b"\xab" * min(w.remaining, 64))
        vq.push(chain.head, w.done)
        vq.needs_interrupt()
    vq.enable_notification()
    vq.disable_notification()
    vq.release()


class MemBackend:
    size = 64 << 10
    block_size = 512
    read_only = False

    def __init__(self):
        self.data = bytearray(self.size)

    def _check(self, offset, length):
        assert 0 <= offset and offset + length <= self.size, (offset, length)

    def readinto(self, offset, buf):
        self._check(offset, len(buf))
        buf[:] = self.data[offset:offset + len(buf)]

    def write(self, offset, data):
        self._check(offset, len(data))
        self.data[offset:offset + len(data)] = data

    def flush(self):
        pass

    def write_zeroes(self, offset, length):
        self._check(offset, length)

    def discard(self, offset, length):
        self._check(offset, length)

    def close(self):
        pass


class PairBackend:
    def __init__(self):
        self.host, self.guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.host.setblocking(False)
        self.fd = self.guest.fileno()

    def set_offload(self, flags):
        pass

    def close(self):
        self.guest.close()
        self.host.close()


def make_device(kind, mem, tmp_path):
    if kind == "blk":
        return VirtioBlk(mem, MemBackend(), threaded=False)
    if kind == "rng":
        return VirtioRng(mem, threaded=False)
    if kind == "console":
        dev = VirtioConsole(mem, sink=lambda b: None, threaded=False)
        dev.send_input(b"input for the guest" * 10)
        return dev
    if kind == "net":
        be = PairBackend()
        be.host.send(bytes(12) + b"\xff" * 60)
        return VirtioNet(mem, be, threaded=False)
    return VirtioVsock(mem, 3, str(tmp_path / f"v{id(mem)}.sock"), threaded=False)


@pytest.mark.parametrize("kind", ["blk", "rng", "console", "net", "vsock"])
@pytest.mark.parametrize("transport", ["mmio", "pci"])
def test_devices_survive_hostile_queues(kind, transport, tmp_path):
    mem = GuestMemory.create(MEM)
    dev = make_device(kind, mem, tmp_path)
    if transport == "mmio":
        drv = MmioDriver(VirtioMmioTransport(dev), mem, alloc_end=DATA)
    else:
        drv = PciDriver(VirtioPciTransport(dev), mem, alloc_end=DATA)

    @given(h=hostile(8), q=st.integers(0, dev.num_queues - 1))
    @EXAMPLES
    def run(h, q):
        mem.fill(0, MEM)
        drv.alloc.next = 0x1000
        drv.setup(queue_sizes={i: 8 for i in range(dev.num_queues)})
        dq = drv.queues[q]
        plant(mem, dq, h)
        drv.kick(q)
        for other in range(dev.num_queues):
            drv.kick(other)
        assert dev.internal_errors == 0, dev.reset_reason
        assert dev.worker.callback_errors == 0

    try:
        run()
    finally:
        dev.close()
        mem.close()


@st.composite
def blk_request(draw):
    rtype = draw(st.sampled_from([0, 1, 4, 8, 11, 13, 14, 99, 2 ** 32 - 1]))
    sector = draw(st.one_of(st.integers(0, 140), st.integers(0, 2 ** 64 - 1)))
    out = draw(st.binary(max_size=1100))
    in_len = draw(st.sampled_from([0, 1, 20, 511, 512, 1024, 4096]))
    return rtype, sector, out, in_len


@given(reqs=st.lists(blk_request(), min_size=1, max_size=6))
@EXAMPLES
def test_blk_random_requests_get_a_status(mem, reqs):
    mem.fill(0, MEM)
    be = MemBackend()
    dev = VirtioBlk(mem, be, threaded=False)
    drv = MmioDriver(VirtioMmioTransport(dev), mem)
    drv.setup()
    q = drv.queues[0]
    for rtype, sector, out, in_len in reqs:
        hdr = struct.pack("<IIQ", rtype, 0, sector)
        q.add([hdr] + ([out] if out else []), ([in_len] if in_len else []) + [1])
    drv.kick(0)
    got = q.wait(len(reqs))
    for _, n, data in got:
        assert data[-1] in (0, 1, 2)
    assert dev.internal_errors == 0
    dev.close()


@given(packets=st.lists(st.tuples(
    st.sampled_from([3, 3, 3, 4, 2 ** 64 - 1]), st.sampled_from([2, 2, 2, 1]),
    st.integers(0, 3), st.integers(0, 3), st.integers(0, 2 ** 32 - 1),
    st.sampled_from([1, 1, 2, 0]), st.integers(0, 9), st.integers(0, 3),
    st.integers(0, 2 ** 32 - 1), st.integers(0, 2 ** 32 - 1),
    st.binary(max_size=64)), min_size=1, max_size=12))
@settings(max_examples=40, deadline=None)
def test_vsock_random_packets(tmp_path_factory, packets):
    mem = GuestMemory.create(MEM)
    path = str(tmp_path_factory.mktemp("vs") / "v.sock")
    dev = VirtioVsock(mem, 3, path, threaded=False)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path + "_1")
    srv.listen(16)
    try:
        drv = MmioDriver(VirtioMmioTransport(dev), mem)
        drv.setup()
        rx, tx = drv.queues[0], drv.queues[1]
        for _ in range(32):
            rx.add([], [HDR.size + 256])
        drv.kick(0)
        for fields in packets:
            *hdr, payload = fields
            raw = HDR.pack(*hdr)
            tx.add([raw] + ([payload] if payload else []))
            drv.kick(1)
        tx.wait(len(packets))
        assert dev.internal_errors == 0, dev.reset_reason
        assert not dev.status & V.STATUS_DEVICE_NEEDS_RESET
    finally:
        dev.close()
        srv.close()
        mem.close()


accesses = st.lists(st.tuples(st.booleans(), st.integers(0, 0x4100), st.sampled_from([1, 2, 4, 8, 3]),
                              st.integers(0, 2 ** 64 - 1)), min_size=1, max_size=40)


@given(ops=accesses)
@settings(max_examples=80, deadline=None)
def test_mmio_registers_survive_random_accesses(ops):
    mem = GuestMemory.create(MEM)
    dev = VirtioRng(mem, threaded=False)
    t = VirtioMmioTransport(dev)
    try:
        for write, off, size, value in ops:
            off %= 0x1000
            if write:
                t.write(off, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
            else:
                assert len(t.read(off, size)) == size
        assert dev.internal_errors == 0
    finally:
        dev.close()
        mem.close()


@given(ops=accesses, cfg=st.lists(st.tuples(st.integers(0, 255), st.binary(min_size=1, max_size=4)),
                                  max_size=20))
@settings(max_examples=80, deadline=None)
def test_pci_registers_survive_random_accesses(ops, cfg):
    mem = GuestMemory.create(MEM)
    dev = VirtioRng(mem, threaded=False)
    t = VirtioPciTransport(dev)
    try:
        for off, data in cfg:
            t.config_write(off, data)
            assert len(t.config_read(off, len(data))) == len(data)
        for write, off, size, value in ops:
            if write:
                t.bar_write(off, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
            else:
                assert len(t.bar_read(off, size)) == size
        assert dev.internal_errors == 0
    finally:
        dev.close()
        mem.close()
