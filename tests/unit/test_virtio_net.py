"""virtio-net over a packet socketpair that stands in for a tap."""
from __future__ import annotations

import socket
import struct

import pytest

from hvkit.devices.irq import RecordingLine
from hvkit.devices.virtio import net as N
from hvkit.devices.virtio import spec as V
from hvkit.devices.virtio.driver import MmioDriver, wait_for
from hvkit.devices.virtio.mmio import VirtioMmioTransport
from hvkit.devices.virtio.net import VirtioNet, parse_mac
from hvkit.errors import ConfigError
from hvkit.memory.guest import GuestMemory

MEM = 8 << 20
FRAME = bytes.fromhex("ffffffffffff" "021122334455" "0806") + bytes(range(46))


class PairBackend:
    """Packet-per-read like a tap: a SOCK_SEQPACKET socketpair."""

    def __init__(self):
        self.host, self.guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.host.settimeout(5)
        self.fd = self.guest.fileno()
        self.offload = None
        self.closed = False

    def set_offload(self, flags):
        self.offload = flags

    def close(self):
        self.closed = True
        self.guest.close()
        self.host.close()


@pytest.fixture
def mem():
    m = GuestMemory.create(MEM)
    yield m
    m.close()


def setup(mem, features=None, **kw):
    be = PairBackend()
    dev = VirtioNet(mem, be, mac="02:aa:bb:cc:dd:ee", **kw)
    irq = RecordingLine()
    drv = MmioDriver(VirtioMmioTransport(dev, irq), mem)
    drv.setup(features)
    return dev, be, drv, irq


def test_mac_parsing():
    assert parse_mac("02:aa:bb:cc:dd:ee") == bytes.fromhex("02aabbccddee")
    assert parse_mac(None)[0] & 0x03 == 0x02
    for bad in ("02:aa", "zz:aa:bb:cc:dd:ee", "01:00:5e:00:00:01", "2:aa:bb:cc:dd:ee"):
        with pytest.raises(ConfigError):
            parse_mac(bad)


def test_config_space(mem):
    dev, be, drv, _ = setup(mem, mtu=1400)
    cfg = drv.read_config(0, 12)
    mac, status, pairs, mtu = struct.unpack("<6sHHH", cfg)
    assert mac == bytes.fromhex("02aabbccddee") and status == 1 and pairs == 1 and mtu == 1400
    assert dev.negotiated(N.F_MTU)
    dev.close()
    assert be.closed


def test_transmit_goes_to_the_backend(mem):
    dev, be, drv, _ = setup(mem)
    tx = drv.queues[1]
    hdr = bytes(12)
    tx.add([hdr, FRAME])
    tx.add([hdr + FRAME], indirect=True)
    drv.kick(1)
    assert be.host.recv(2048) == hdr + FRAME
    assert be.host.recv(2048) == hdr + FRAME
    tx.wait(2)
    assert dev.stats["tx_packets"] == 2 and dev.stats["tx_bytes"] == 2 * len(FRAME)
    dev.close()


def test_receive_fills_guest_buffers(mem):
    dev, be, drv, irq = setup(mem)
    rx = drv.queues[0]
    hdr = struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 0)
    be.host.send(hdr + FRAME)                 # before any buffer: waits in the backend
    for _ in range(4):
        rx.add([], [N.HDR_SIZE, 1514])        # header and frame in separate buffers
    drv.kick(0)
    [(_, n, data)] = rx.wait(1)
    assert n == 12 + len(FRAME)
    assert struct.unpack_from("<H", data, 10)[0] == 1          # num_buffers
    assert data[12:] == FRAME
    be.host.send(hdr + FRAME[::-1])
    [(_, n, data)] = rx.wait(1)
    assert data[12:] == FRAME[::-1]
    wait_for(lambda: irq.level)
    dev.close()


def test_receive_waits_for_buffers_then_resumes(mem):
    dev, be, drv, _ = setup(mem)
    rx = drv.queues[0]
    for i in range(3):
        be.host.send(bytes(12) + bytes([i]) * 60)
    rx.add([], [2048])
    drv.kick(0)
    assert rx.wait(1)[0][2][12:] == bytes([0]) * 60
    rx.add([], [2048])
    rx.add([], [2048])
    drv.kick(0)
    got = rx.wait(2)
    assert [d[12] for _, _, d in got] == [1, 2]
    dev.close()


def test_offloads_follow_the_guest(mem):
    dev, be, drv, _ = setup(mem)
    assert be.offload == N.TUN_F_CSUM | N.TUN_F_TSO4 | N.TUN_F_TSO6 | N.TUN_F_TSO_ECN
    dev.close()
    dev, be, drv, _ = setup(mem, features=(1 << N.F_MAC) | (1 << N.F_STATUS))
    assert be.offload == 0
    dev.close()
    dev, be, drv, _ = setup(mem, offloads=False)
    assert not dev.avail_features & (1 << N.F_GUEST_TSO4) and be.offload == 0
    dev.close()


def test_link_status_change_interrupts(mem):
    dev, be, drv, irq = setup(mem)
    gen = drv.r32(0xFC)
    dev.set_link(False)
    assert struct.unpack("<H", drv.read_config(6, 2))[0] == 0
    assert drv.r32(0xFC) != gen
    assert drv.interrupt_status() & V.INT_CONFIG and irq.level
    dev.close()


def test_bad_transmit_chains_are_dropped(mem):
    dev, be, drv, _ = setup(mem)
    tx = drv.queues[1]
    tx.add([b"short"])                          # less than a header
    tx.add([bytes(12)], [16])                   # a writable buffer on tx
    tx.add([bytes(12) + FRAME])
    drv.kick(1)
    assert be.host.recv(2048) == bytes(12) + FRAME
    tx.wait(3)
    assert dev.stats["tx_dropped"] == 2 and dev.stats["tx_packets"] == 1
    dev.close()


def test_reset_stops_service(mem):
    dev, be, drv, _ = setup(mem)
    drv.set_status(0)
    be.host.send(bytes(12) + FRAME)
    assert not dev.active
    drv.setup()
    rx = drv.queues[0]
    rx.add([], [2048])
    drv.kick(0)
    assert rx.wait(1)[0][2][12:] == FRAME
    dev.close()
