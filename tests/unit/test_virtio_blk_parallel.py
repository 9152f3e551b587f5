"""virtio-blk with reads and writes on I/O threads: many in flight, answered
as they finish, and nothing taken from the ring is lost across a flush, a
snapshot or a reset."""
from __future__ import annotations

import struct
import threading
import time

import pytest

from hvkit.devices.irq import RecordingMsi
from hvkit.devices.virtio import blk as B
from hvkit.devices.virtio.blk import VirtioBlk
from hvkit.devices.virtio.driver import PciDriver
from hvkit.devices.virtio.pci import VirtioPciTransport
from hvkit.memory.guest import GuestMemory


class SlowBackend:
    """A thread-safe in-memory disk whose I/O takes time; sector 0 is slowest."""

    def __init__(self, size: int = 1 << 20) -> None:
        self.data = bytearray(size)
        self.size, self.block_size, self.read_only = size, 512, False
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.log: list[str] = []

    def _io(self, offset: int, fn) -> None:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(0.05 if offset == 0 else 0.01)
        with self.lock:
            fn()
            self.running -= 1

    def readinto(self, offset, buf):
        self._io(offset, lambda: buf.__setitem__(slice(None), self.data[offset:offset + len(buf)]))

    def write(self, offset, data):
        def do():
            self.data[offset:offset + len(data)] = data
            self.log.append(f"w{offset // 512}")
        self._io(offset, do)

    def flush(self):
        with self.lock:
            self.log.append(f"flush after {self.running} running")

    def write_zeroes(self, offset, length):
        pass

    def discard(self, offset, length):
        pass

    def close(self):
        pass


@pytest.fixture
def setup():
    mem = GuestMemory.create(4 << 20)
    be = SlowBackend()
    dev = VirtioBlk(mem, be, io_threads=8)
    drv = PciDriver(VirtioPciTransport(dev, RecordingMsi()), mem)
    drv.setup(features=0)
    yield dev, drv.queues[0], drv, be
    dev.close()
    mem.close()


def request(q, rtype: int, sector: int, data: bytes = b"", in_len: int = 0) -> int:
    hdr = struct.pack("<IIQ", rtype, 0, sector)
    out = [hdr, data] if data else [hdr]
    return q.add(out, [in_len, 1] if in_len else [1])


def test_writes_run_together_and_complete_as_they_finish(setup):
    dev, q, drv, be = setup
    heads = [request(q, B.T_OUT, 8 * i, bytes([i]) * 4096) for i in range(8)]
    drv.kick(0)
    got = q.wait(8)
    assert be.most > 1                                # in flight together
    assert {h for h, _, _ in got} == set(heads)
    assert got[-1][0] == heads[0]                     # sector 0, the slowest, came last
    assert all(data[-1] == B.S_OK for _, _, data in got)
    assert dev.completed[B.S_OK] == 8


def test_flush_waits_for_the_writes_before_it(setup):
    dev, q, drv, be = setup
    for i in range(4):
        request(q, B.T_OUT, 8 * i, b"x" * 4096)
    request(q, B.T_FLUSH, 0)
    drv.kick(0)
    q.wait(5)
    assert be.log[-1] == "flush after 0 running" and len(be.log) == 5


def test_snapshot_answers_requests_in_flight(setup):
    dev, q, drv, be = setup
    for i in range(4):
        request(q, B.T_IN, 8 * i, in_len=4096)
    drv.kick(0)
    time.sleep(0.005)
    state = dev.state()
    assert state["queues"][0]["used_idx"] == state["queues"][0]["last_avail"] == 4
    assert len(q.wait(4)) == 4


def test_reset_waits_and_drops_requests_in_flight(setup):
    dev, q, drv, be = setup
    request(q, B.T_OUT, 0, b"y" * 4096)
    drv.kick(0)
    time.sleep(0.01)
    drv.set_status(0)                                 # the I/O finishes, no completion
    assert be.running == 0 and be.data[:4096] == b"y" * 4096
    assert dev.queues[0].used_idx == 0


def test_pause_answers_what_is_in_flight_and_serves_nothing_new(setup):
    dev, q, drv, be = setup
    for i in range(3):
        request(q, B.T_OUT, 8 * i, b"z" * 4096)
    drv.kick(0)
    time.sleep(0.005)
    dev.pause()
    assert be.running == 0 and dev.queues[0].used_idx == 3      # answered before pause returned
    request(q, B.T_IN, 0, in_len=4096)
    drv.kick(0)
    snapshot = dev.mem.read(0, 4 << 20)
    time.sleep(0.1)
    assert dev.queues[0].used_idx == 3                            # not served while paused
    assert dev.mem.read(0, 4 << 20) == snapshot                   # guest memory holds still
    dev.resume()
    assert len(q.wait(4)) == 4
