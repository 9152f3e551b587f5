"""virtio-vsock moves a stream in batches: a pass's data packets reach the
socket in one sendmsg, one read fills several receive buffers. What a user
relies on stays: order, every byte, credit, and control packets after the
data sent before them."""
from __future__ import annotations

import socket

import pytest

from hvkit.devices.virtio import vsock as VS
from hvkit.devices.virtio.vsock import VirtioVsock
from hvkit.memory.guest import GuestMemory

from test_virtio_vsock import CID, Guest, listener, recv_exact


@pytest.fixture
def mem():
    m = GuestMemory.create(16 << 20)
    yield m
    m.close()


@pytest.fixture
def uds(tmp_path):
    return str(tmp_path / "v.sock")


def connect(dev, mem, uds, port, *, buf_alloc=1 << 20, rx_buffers=32, rx_size=4096):
    g = Guest(dev, mem, rx_buffers=rx_buffers, rx_size=rx_size)
    srv = listener(f"{uds}_{port}")
    g.send(VS.OP_REQUEST, 5000, port, buf_alloc=buf_alloc)
    g.expect(VS.OP_RESPONSE)
    host, _ = srv.accept()
    srv.close()
    return g, host


def queue(g, op, data=b"", *, flags=0, port=80, buf_alloc=1 << 20, fwd_cnt=0):
    """Make a packet available without notifying: a later kick finds them all."""
    hdr = VS.HDR.pack(CID, 2, 5000, port, len(data), 1, op, flags, buf_alloc, fwd_cnt)
    g.tx.add([hdr] + ([data] if data else []))


def test_a_pass_of_data_packets_arrives_whole_and_in_order(mem, uds):
    dev = VirtioVsock(mem, CID, uds)
    g, host = connect(dev, mem, uds, 80)
    parts = [bytes([i]) * (100 + 37 * i) for i in range(40)]
    for p in parts:
        queue(g, VS.OP_RW, p)
    g.drv.kick(1)
    g.tx.wait(40)                        # every chain comes back once sent
    assert recv_exact(host, sum(map(len, parts))) == b"".join(parts)
    dev.close()


def test_shutdown_after_data_in_one_pass_comes_after_the_data(mem, uds):
    dev = VirtioVsock(mem, CID, uds)
    g, host = connect(dev, mem, uds, 81)
    queue(g, VS.OP_RW, b"first ", port=81)
    queue(g, VS.OP_RW, b"second", port=81)
    queue(g, VS.OP_SHUTDOWN, flags=VS.SHUTDOWN_SEND, port=81)
    g.drv.kick(1)
    g.tx.wait(3)
    host.settimeout(5)
    got = b""
    while chunk := host.recv(100):       # then EOF: the guest's SHUTDOWN(SEND)
        got += chunk
    assert got == b"first second"
    dev.close()


def test_data_then_rst_in_one_pass_delivers_the_data(mem, uds):
    dev = VirtioVsock(mem, CID, uds)
    g, host = connect(dev, mem, uds, 82)
    queue(g, VS.OP_RW, b"last words", port=82)
    queue(g, VS.OP_RST, port=82)
    g.drv.kick(1)
    g.tx.wait(2)
    host.settimeout(5)
    assert recv_exact(host, 10) == b"last words"
    assert host.recv(10) == b""
    assert dev.connections() == []
    dev.close()


def test_a_socket_that_takes_little_keeps_the_rest_in_order(mem, uds):
    dev = VirtioVsock(mem, CID, uds, buf_alloc=1 << 20)
    g, host = connect(dev, mem, uds, 83)
    host.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    data = bytes(i % 253 for i in range(300_000))
    for i in range(0, len(data), 3000):
        queue(g, VS.OP_RW, data[i:i + 3000], port=83)
    g.drv.kick(1)
    assert recv_exact(host, len(data)) == data
    dev.close()


@pytest.mark.parametrize("rx_size", [4096, 1000])
def test_one_read_fills_several_buffers_in_order(mem, uds, rx_size):
    dev = VirtioVsock(mem, CID, uds)
    g, host = connect(dev, mem, uds, 84, rx_size=rx_size)
    data = bytes(i % 251 for i in range(50_000))
    host.sendall(data)
    got = b""
    while len(got) < len(data):
        p = g.expect(VS.OP_RW)
        assert len(p[-1]) == p[4] <= rx_size
        got += p[-1]
    assert got == data
    dev.close()


def test_a_batched_read_stays_within_the_guests_credit(mem, uds):
    dev = VirtioVsock(mem, CID, uds)
    g, host = connect(dev, mem, uds, 85, buf_alloc=10_000, rx_size=4096)
    data = bytes(i % 251 for i in range(30_000))
    host.sendall(data)
    got = [p[-1] for p in g.packets(3)]
    assert [len(x) for x in got] == [4096, 4096, 1808]   # 10,000 bytes of credit
    assert g.packets(1, timeout=0.3) == []
    g.send(VS.OP_CREDIT_UPDATE, 5000, 85, buf_alloc=10_000, fwd_cnt=10_000)
    more = b""
    while len(more) < 10_000:
        more += g.expect(VS.OP_RW)[-1]
    assert b"".join(got) + more == data[:20_000]
    dev.close()
