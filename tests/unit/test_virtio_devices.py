"""virtio-rng, virtio-blk and virtio-console round trips, over both transports."""
from __future__ import annotations

import os
import struct

import pytest

from hvkit.devices.irq import RecordingLine, RecordingMsi
from hvkit.devices.virtio import blk as B
from hvkit.devices.virtio.blk import VirtioBlk
from hvkit.devices.virtio.console import VirtioConsole
from hvkit.devices.virtio.driver import MmioDriver, PciDriver
from hvkit.devices.virtio.mmio import VirtioMmioTransport
from hvkit.devices.virtio.pci import VirtioPciTransport
from hvkit.devices.virtio.rng import VirtioRng
from hvkit.memory.guest import GuestMemory
from hvkit.storage.raw import RawFileBackend

MEM = 4 << 20


class MemBackend:
    """A BlockBackend in a bytearray, recording what it was asked."""

    def __init__(self, size: int = 1 << 20, read_only: bool = False, block_size: int = 512):
        self.data = bytearray(size)
        self.size = size
        self.block_size = block_size
        self.read_only = read_only
        self.calls: list[tuple] = []

    def readinto(self, offset, buf):
        assert 0 <= offset and offset + len(buf) <= self.size
        buf[:] = self.data[offset:offset + len(buf)]

    def write(self, offset, data):
        assert not self.read_only and 0 <= offset and offset + len(data) <= self.size
        self.data[offset:offset + len(data)] = data

    def flush(self):
        self.calls.append(("flush",))

    def write_zeroes(self, offset, length):
        assert offset + length <= self.size
        self.calls.append(("zeroes", offset, length))
        self.data[offset:offset + length] = bytes(length)

    def discard(self, offset, length):
        assert offset + length <= self.size
        self.calls.append(("discard", offset, length))

    def close(self):
        pass


@pytest.fixture
def mem():
    m = GuestMemory.create(MEM)
    yield m
    m.close()


def attach(dev, mem, transport):
    if transport == "mmio":
        t = VirtioMmioTransport(dev, RecordingLine())
        return MmioDriver(t, mem)
    t = VirtioPciTransport(dev, RecordingMsi())
    return PciDriver(t, mem)


# -- rng --------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["mmio", "pci"])
def test_rng_fills_buffers(mem, transport):
    dev = VirtioRng(mem)
    drv = attach(dev, mem, transport)
    drv.setup()
    q = drv.queues[0]
    q.add([], [64, 64])
    q.add([], [16], indirect=True)
    drv.kick(0)
    got = q.wait(2)
    assert sorted(n for _, n, _ in got) == [16, 128]
    assert all(data != b"\xee" * len(data) for _, _, data in got)
    dev.close()


def test_rng_caps_a_huge_request(mem):
    dev = VirtioRng(mem, max_request=4096, threaded=False)
    drv = attach(dev, mem, "mmio")
    drv.setup()
    q = drv.queues[0]
    q.add([], [1 << 20])
    drv.kick(0)
    assert q.wait(1)[0][1] == 4096


# -- blk --------------------------------------------------------------------------------


def blk_req(q, rtype, sector, out=b"", in_len=0, indirect=False):
    hdr = struct.pack("<IIQ", rtype, 0, sector)
    outs = [hdr] + ([out] if out else [])
    return q.add(outs, ([in_len] if in_len else []) + [1], indirect=indirect)


def status_of(data: bytes) -> int:
    return data[-1]


def test_blk_config_space(mem):
    be = MemBackend(1 << 20, block_size=4096)
    dev = VirtioBlk(mem, be, threaded=False)
    drv = attach(dev, mem, "mmio")
    cfg = drv.read_config(0, 60)
    assert struct.unpack_from("<Q", cfg, 0)[0] == 2048
    assert struct.unpack_from("<I", cfg, 20)[0] == 4096
    assert struct.unpack_from("<I", cfg, 12)[0] == 254
    assert struct.unpack_from("<H", cfg, 34)[0] == 1


@pytest.mark.parametrize("transport", ["mmio", "pci"])
def test_blk_read_write_flush_id(mem, transport, tmp_path):
    path = tmp_path / "disk.img"
    be = RawFileBackend.create(path, 1 << 20, direct=False)
    dev = VirtioBlk(mem, be, serial="disk-0")
    drv = attach(dev, mem, transport)
    drv.setup()
    q = drv.queues[0]
    payload = os.urandom(4096)
    blk_req(q, B.T_OUT, 8, payload)
    drv.kick(0)
    [(_, n, data)] = q.wait(1)
    assert n == 1 and status_of(data) == B.S_OK
    blk_req(q, B.T_IN, 8, in_len=4096, indirect=True)
    drv.kick(0)
    [(_, n, data)] = q.wait(1)
    assert n == 4097 and data[:4096] == payload and status_of(data) == B.S_OK
    blk_req(q, B.T_FLUSH, 0)
    blk_req(q, B.T_GET_ID, 0, in_len=20)
    drv.kick(0)
    got = q.wait(2)
    assert status_of(got[0][2]) == B.S_OK
    assert got[1][2][:20] == b"disk-0".ljust(20, b"\0")
    dev.close()
    be.close()
    with open(path, "rb") as f:
        f.seek(8 * 512)
        assert f.read(4096) == payload


def test_blk_bad_requests(mem):
    be = MemBackend(1 << 20)
    dev = VirtioBlk(mem, be, threaded=False)
    drv = attach(dev, mem, "mmio")
    drv.setup()
    q = drv.queues[0]
    cases = [
        (B.T_IN, 2048, b"", 512, B.S_IOERR),          # past the end
        (B.T_IN, 2047, b"", 1024, B.S_IOERR),         # straddles the end
        (B.T_IN, 0, b"", 100, B.S_IOERR),             # not whole sectors
        (B.T_OUT, 2 ** 63, b"x" * 512, 0, B.S_IOERR),  # huge sector
        (99, 0, b"", 0, B.S_UNSUPP),                  # unknown type
        (B.T_DISCARD, 0, struct.pack("<QII", 0, 8, 1), 0, B.S_UNSUPP),   # discard + unmap
        (B.T_DISCARD, 0, struct.pack("<QII", 2040, 16, 0), 0, B.S_IOERR),
        (B.T_DISCARD, 0, b"short", 0, B.S_IOERR),
    ]
    for rtype, sector, out, in_len, want in cases:
        blk_req(q, rtype, sector, out, in_len)
        drv.kick(0)
        [(_, _, data)] = q.wait(1)
        assert status_of(data) == want, (rtype, sector)
    # no status byte at all: returned with length 0, nothing written
    q.add([struct.pack("<IIQ", B.T_IN, 0, 0)])
    drv.kick(0)
    assert q.wait(1)[0][1] == 0
    # header shorter than 16 bytes: IOERR
    q.add([b"\0" * 8], [1])
    drv.kick(0)
    assert status_of(q.wait(1)[0][2]) == B.S_IOERR
    assert dev.status & 0x40 == 0


def test_blk_discard_and_write_zeroes(mem):
    be = MemBackend(1 << 20)
    be.data[:] = b"\xaa" * be.size
    dev = VirtioBlk(mem, be, threaded=False)
    drv = attach(dev, mem, "mmio")
    drv.setup()
    q = drv.queues[0]
    segs = struct.pack("<QII", 0, 8, 0) + struct.pack("<QII", 100, 2, 1)
    blk_req(q, B.T_WRITE_ZEROES, 0, segs)
    blk_req(q, B.T_DISCARD, 0, struct.pack("<QII", 16, 8, 0))
    drv.kick(0)
    got = q.wait(2)
    assert [status_of(d) for _, _, d in got] == [B.S_OK, B.S_OK]
    assert be.data[:4096] == bytes(4096) and be.data[100 * 512:102 * 512] == bytes(1024)
    assert ("discard", 16 * 512, 8 * 512) in be.calls


def test_blk_read_only(mem):
    be = MemBackend(1 << 20, read_only=True)
    dev = VirtioBlk(mem, be, threaded=False)
    assert dev.avail_features >> B.F_RO & 1
    assert not dev.avail_features >> B.F_DISCARD & 1
    drv = attach(dev, mem, "pci")
    drv.setup()
    q = drv.queues[0]
    blk_req(q, B.T_OUT, 0, b"x" * 512)
    blk_req(q, B.T_WRITE_ZEROES, 0, struct.pack("<QII", 0, 1, 0))
    blk_req(q, B.T_IN, 0, in_len=512)
    drv.kick(0)
    got = q.wait(3)
    assert [status_of(d) for _, _, d in got] == [B.S_IOERR, B.S_IOERR, B.S_OK]


def test_blk_backend_error_is_ioerr(mem):
    class Failing(MemBackend):
        def readinto(self, offset, buf):
            raise OSError(5, "I/O error")
    dev = VirtioBlk(mem, Failing(), threaded=False)
    drv = attach(dev, mem, "mmio")
    drv.setup()
    q = drv.queues[0]
    blk_req(q, B.T_IN, 0, in_len=512)
    drv.kick(0)
    assert status_of(q.wait(1)[0][2]) == B.S_IOERR


# -- console ------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["mmio", "pci"])
def test_console_output_and_input(mem, transport):
    dev = VirtioConsole(mem)
    drv = attach(dev, mem, transport)
    drv.setup()
    rx, tx = drv.queues[0], drv.queues[1]
    tx.add([b"hello ", b"from the guest\n"])
    drv.kick(1)
    assert dev.wait_output(b"hello from the guest\n", 5)
    tx.wait(1)
    # input before any receive buffer waits; then fills buffers in order
    assert dev.send_input(b"typed input") == 11
    rx.add([], [5])
    rx.add([], [64])
    drv.kick(0)
    got = rx.wait(2)
    assert b"".join(d for _, _, d in got) == b"typed input"
    dev.close()


def test_console_feed_fd_and_emergency_write(mem):
    r, w = os.pipe()
    out = []
    dev = VirtioConsole(mem, sink=out.append, feed_fd=r)
    drv = attach(dev, mem, "mmio")
    drv.setup()
    drv.t.write(0x100 + 8, struct.pack("<I", ord("!")))
    assert out == [b"!"]
    rx = drv.queues[0]
    rx.add([], [32])
    drv.kick(0)
    os.write(w, b"from a pipe")
    assert rx.wait(1)[0][2] == b"from a pipe"
    os.close(w)
    dev.close()
    os.close(r)


def test_console_input_is_bounded(mem):
    dev = VirtioConsole(mem, max_input=8, threaded=False)
    assert dev.send_input(b"0123456789") == 8
    assert dev.send_input(b"x") == 0
