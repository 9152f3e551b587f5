"""virtio-vsock moves a stream in batches: a pass's data packets reach the
socket in one sendmsg, one read fills several receive buffers. What a user
relies on stays: order, every byte, credit, and control packets after the
data sent before them."""
from __future__ import annotations

import socket

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from hvkit.devices.virtio import vsock as VS
from hvkit.devices.virtio.driver import wait_for
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


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.one_of(st.integers(1, 60), st.integers(45, 6000)), min_size=1,
                      max_size=24),
       readable=st.lists(st.booleans(), min_size=1, max_size=24),
       length=st.integers(1, 40_000))
def test_any_mix_of_rx_buffers_carries_the_stream_whole(mem, tmp_path_factory, sizes,
                                                        readable, length):
    """Receive buffers of any size (some too small for a header, some with
    a device-readable part in front) carry a stream whole and in order:
    batched reads skip, give back or fail buffers, never reuse one."""
    uds = str(tmp_path_factory.mktemp("vs") / "v.sock")
    dev = VirtioVsock(mem, CID, uds)
    try:
        g, host = connect(dev, mem, uds, 86, rx_buffers=2)
        data = bytes((i * 7) % 251 for i in range(length))
        host.sendall(data)
        posted = set(g.rx.inflight)           # the buffers connect() left with the device

        usable = sizes + [VS.HDR.size + 1000]    # at least one buffer in the cycle holds data

        def post(i: int) -> None:
            size = usable[i % len(usable)]
            head = g.rx.add([b"r" * 8] if readable[i % len(readable)] else [], [size])
            posted.add(head)

        for i in range(16):
            post(i)
        g.drv.kick(0)
        got, n = b"", 16
        while len(got) < length:
            for head, used, written in g.rx.wait(1, timeout=5):
                assert head in posted, head   # never a buffer twice
                posted.discard(head)
                if used:                      # 0: a buffer the device could not use
                    fields = VS.HDR.unpack(written[:VS.HDR.size])
                    if fields[6] == VS.OP_RW:
                        assert fields[4] == used - VS.HDR.size
                        got += written[VS.HDR.size:used]
                post(n)
                n += 1
            g.drv.kick(0)
        assert got == data
        # every buffer not returned is still the device's to use: none was lost
        wait_for(lambda: dev.queues[VS.RX].pending() == len(posted))
    finally:
        dev.close()


def test_buffers_a_read_did_not_reach_stay_with_the_device(mem, uds):
    """A read into 16 buffers that finds 2.5 buffers' worth of data gives the
    other 13 back: later data still has every buffer the guest posted."""
    dev = VirtioVsock(mem, CID, uds)
    try:
        g, host = connect(dev, mem, uds, 87, rx_buffers=1)    # one left posted
        for _ in range(15):
            g.rx.add([], [VS.HDR.size + 4096])
        host.sendall(bytes(range(251)) * 40)            # 10,040 bytes
        g.drv.kick(0)
        got = g.rx.wait(3)
        assert [n - VS.HDR.size for _, n, _ in got] == [4096, 4096, 1848]
        wait_for(lambda: dev.queues[VS.RX].pending() == 13)
        host.sendall(b"x" * 13 * 4096)                  # exactly what is left
        more = g.rx.wait(13)
        assert b"".join(d[VS.HDR.size:n] for _, n, d in more) == b"x" * 13 * 4096
    finally:
        dev.close()
