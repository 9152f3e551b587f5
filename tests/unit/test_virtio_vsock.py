"""virtio-vsock with Firecracker's UNIX-socket model, the guest played in Python."""
from __future__ import annotations

import os
import socket
import struct
import time

import pytest

from hvkit.devices.irq import RecordingLine
from hvkit.devices.virtio import vsock as VS
from hvkit.devices.virtio.driver import MmioDriver, wait_for
from hvkit.devices.virtio.mmio import VirtioMmioTransport
from hvkit.devices.virtio.vsock import VirtioVsock
from hvkit.errors import ConfigError
from hvkit.memory.guest import GuestMemory

MEM = 8 << 20
CID = 3


class Guest:
    """The guest's vsock driver, reduced to packets."""

    def __init__(self, dev, mem, rx_buffers=32, rx_size=4096):
        self.dev = dev
        self.drv = MmioDriver(VirtioMmioTransport(dev, RecordingLine()), mem)
        self.drv.setup()
        self.rx, self.tx = self.drv.queues[0], self.drv.queues[1]
        self.rx_size = rx_size
        for _ in range(rx_buffers):
            self.rx.add([], [VS.HDR.size + rx_size])
        self.drv.kick(0)
        self.backlog = []

    def send(self, op, src_port, dst_port, data=b"", *, flags=0, buf_alloc=1 << 16,
             fwd_cnt=0, src_cid=CID, dst_cid=2, ptype=1):
        hdr = VS.HDR.pack(src_cid, dst_cid, src_port, dst_port, len(data), ptype, op, flags,
                          buf_alloc, fwd_cnt)
        self.tx.add([hdr] + ([data] if data else []))
        self.drv.kick(1)
        self.tx.wait(1)

    def packets(self, count=1, timeout=5.0):
        out = self.backlog
        self.backlog = []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            left = max(deadline - time.monotonic(), 0.001)
            try:
                got = self.rx.wait(1, timeout=left)
            except TimeoutError:
                break
            for _, n, data in got:
                fields = VS.HDR.unpack(data[:VS.HDR.size])
                out.append(fields + (data[VS.HDR.size:n],))
                self.rx.add([], [VS.HDR.size + self.rx_size])
            self.drv.kick(0)
        self.backlog = out[count:]
        return out[:count]

    def expect(self, op, timeout=5.0):
        [p] = self.packets(1, timeout)
        assert p[6] == op, p
        return p


@pytest.fixture
def mem():
    m = GuestMemory.create(MEM)
    yield m
    m.close()


@pytest.fixture
def uds(tmp_path):
    return str(tmp_path / "v.sock")


def listener(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(8)
    s.settimeout(5)
    return s


def recv_exact(sock, n):
    buf = b""
    sock.settimeout(5)
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, "unexpected EOF"
        buf += chunk
    return buf


def test_guest_connects_to_host_socket(mem, uds):
    dev = VirtioVsock(mem, CID, uds)
    g = Guest(dev, mem)
    srv = listener(f"{uds}_1234")
    g.send(VS.OP_REQUEST, 5000, 1234)
    p = g.expect(VS.OP_RESPONSE)
    assert (p[0], p[1], p[2], p[3]) == (2, CID, 1234, 5000)
    host, _ = srv.accept()
    g.send(VS.OP_RW, 5000, 1234, b"hello host")
    assert recv_exact(host, 10) == b"hello host"
    host.sendall(b"hello guest")
    data = b""
    while len(data) < 11:
        p = g.expect(VS.OP_RW)
        data += p[-1]
    assert data == b"hello guest"
    assert dev.connections() == [(1234, 5000, "established")]
    host.close()
    g.expect(VS.OP_SHUTDOWN)
    g.send(VS.OP_RST, 5000, 1234)
    wait_for(lambda: dev.connections() == [])
    dev.close()
    assert not os.path.exists(uds)


def test_host_connects_to_guest_port(mem, uds):
    dev = VirtioVsock(mem, CID, uds)
    g = Guest(dev, mem)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(uds)
    c.sendall(b"CONNECT 52\nearly data")
    p = g.expect(VS.OP_REQUEST)
    host_port = p[2]
    assert p[3] == 52 and host_port >= VS.FIRST_LOCAL_PORT
    g.send(VS.OP_RESPONSE, 52, host_port)
    assert recv_exact(c, len(f"OK {host_port}\n")) == f"OK {host_port}\n".encode()
    p = g.expect(VS.OP_RW)
    assert p[-1] == b"early data"
    g.send(VS.OP_RW, 52, host_port, b"reply")
    assert recv_exact(c, 5) == b"reply"
    g.send(VS.OP_SHUTDOWN, 52, host_port, flags=3)
    g.expect(VS.OP_RST)
    c.settimeout(5)
    assert c.recv(10) == b""
    dev.close()


def test_host_half_close_leaves_the_guest_its_sending_side(mem, uds):
    """A host client that sends a request and shuts down its writing side
    (shutdown(SHUT_WR)) still reads the reply: the guest is told the host
    sends no more (SHUTDOWN with SEND only), its data still reaches the host,
    and the guest's own close ends the connection."""
    dev = VirtioVsock(mem, CID, uds)
    g = Guest(dev, mem)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(uds)
    c.sendall(b"CONNECT 53\n")
    host_port = g.expect(VS.OP_REQUEST)[2]
    g.send(VS.OP_RESPONSE, 53, host_port)
    assert recv_exact(c, len(f"OK {host_port}\n")) == f"OK {host_port}\n".encode()
    c.sendall(b"request")
    c.shutdown(socket.SHUT_WR)
    data = b""
    while len(data) < 7:
        data += g.expect(VS.OP_RW)[-1]
    assert data == b"request"
    p = g.expect(VS.OP_SHUTDOWN)
    assert p[7] == VS.SHUTDOWN_SEND
    g.send(VS.OP_RW, 53, host_port, b"the reply")
    assert recv_exact(c, 9) == b"the reply"
    assert dev.connections() == [(host_port, 53, "established")]
    g.send(VS.OP_SHUTDOWN, 53, host_port, flags=VS.SHUTDOWN_RCV | VS.SHUTDOWN_SEND)
    g.expect(VS.OP_RST)
    c.settimeout(5)
    assert c.recv(10) == b""
    assert dev.connections() == []
    dev.close()


def test_refused_connection_gets_rst(mem, uds):
    dev = VirtioVsock(mem, CID, uds)
    g = Guest(dev, mem)
    g.send(VS.OP_REQUEST, 5000, 999)               # nobody listens on <uds>_999
    p = g.expect(VS.OP_RST)
    assert (p[2], p[3]) == (999, 5000)
    g.send(VS.OP_RW, 5001, 999, b"x")              # data for no connection
    g.expect(VS.OP_RST)
    dev.close()


def test_guest_refuses_host_connection(mem, uds):
    dev = VirtioVsock(mem, CID, uds)
    g = Guest(dev, mem)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(uds)
    c.sendall(b"CONNECT 7\n")
    p = g.expect(VS.OP_REQUEST)
    g.send(VS.OP_RST, 7, p[2])
    c.settimeout(5)
    assert c.recv(10) == b""
    dev.close()


def test_bad_connect_line_closes_socket(mem, uds):
    dev = VirtioVsock(mem, CID, uds)
    Guest(dev, mem)
    for line in (b"HELLO 5\n", b"CONNECT x\n", b"A" * 64):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(uds)
        c.sendall(line)
        c.settimeout(5)
        try:
            assert c.recv(10) == b""
        except ConnectionResetError:      # closed with our bytes unread
            pass
        c.close()
    dev.close()


def test_credit_limits_what_the_host_sends(mem, uds):
    dev = VirtioVsock(mem, CID, uds)
    g = Guest(dev, mem)
    srv = listener(f"{uds}_80")
    g.send(VS.OP_REQUEST, 6000, 80, buf_alloc=8)
    g.expect(VS.OP_RESPONSE)
    host, _ = srv.accept()
    host.sendall(b"0123456789abcdefghij")
    p = g.expect(VS.OP_RW)
    assert p[-1] == b"01234567"                     # exactly the guest's buffer
    assert g.packets(1, timeout=0.3) == []          # no credit, nothing more
    g.send(VS.OP_CREDIT_UPDATE, 6000, 80, buf_alloc=8, fwd_cnt=8)
    assert g.expect(VS.OP_RW)[-1] == b"89abcdef"
    g.send(VS.OP_CREDIT_REQUEST, 6000, 80, buf_alloc=8, fwd_cnt=16)
    got = g.packets(2)
    assert sorted(p[6] for p in got) == [VS.OP_RW, VS.OP_CREDIT_UPDATE]
    assert [p[-1] for p in got if p[6] == VS.OP_RW] == [b"ghij"]
    dev.close()


def test_guest_exceeding_credit_is_reset(mem, uds):
    dev = VirtioVsock(mem, CID, uds, buf_alloc=64 << 10)
    g = Guest(dev, mem)
    srv = listener(f"{uds}_81")
    g.send(VS.OP_REQUEST, 6001, 81)
    g.expect(VS.OP_RESPONSE)
    host, _ = srv.accept()                          # never reads
    chunk = b"z" * (32 << 10)
    for _ in range(64):
        g.send(VS.OP_RW, 6001, 81, chunk)
        if dev.connections() == []:
            break
    assert dev.connections() == []
    got = g.packets(8, timeout=1)
    assert VS.OP_RST in [p[6] for p in got]
    dev.close()


def test_many_connections(mem, uds):
    dev = VirtioVsock(mem, CID, uds)
    g = Guest(dev, mem, rx_buffers=64)
    srv = listener(f"{uds}_90")
    hosts = []
    for i in range(20):
        g.send(VS.OP_REQUEST, 7000 + i, 90)
        hosts.append(srv.accept()[0])
    assert [p[6] for p in g.packets(20)] == [VS.OP_RESPONSE] * 20
    for i, h in enumerate(hosts):
        g.send(VS.OP_RW, 7000 + i, 90, f"conn {i}".encode())
    for i, h in enumerate(hosts):
        assert recv_exact(h, len(f"conn {i}")) == f"conn {i}".encode()
    for i, h in enumerate(hosts):
        h.sendall(bytes([i]) * 3)
    got = {}
    while sum(len(v) for v in got.values()) < 60:
        p = g.expect(VS.OP_RW)
        got[p[3]] = got.get(p[3], b"") + p[-1]
    assert got == {7000 + i: bytes([i]) * 3 for i in range(20)}
    dev.close()


def test_foreign_packets_ignored(mem, uds):
    dev = VirtioVsock(mem, CID, uds)
    g = Guest(dev, mem)
    g.send(VS.OP_REQUEST, 1, 2, src_cid=99)        # spoofed source CID: dropped
    g.send(VS.OP_REQUEST, 1, 2, dst_cid=7)         # not for the host: dropped
    assert g.packets(1, timeout=0.3) == []
    g.send(VS.OP_REQUEST, 1, 2, ptype=2)           # seqpacket: not supported
    g.expect(VS.OP_RST)
    dev.close()


def test_reset_closes_everything(mem, uds):
    dev = VirtioVsock(mem, CID, uds)
    g = Guest(dev, mem)
    srv = listener(f"{uds}_5")
    g.send(VS.OP_REQUEST, 9, 5)
    g.expect(VS.OP_RESPONSE)
    host, _ = srv.accept()
    g.drv.set_status(0)
    assert dev.connections() == []
    host.settimeout(5)
    assert host.recv(1) == b""
    dev.close()


def test_transport_reset_event(mem, uds):
    dev = VirtioVsock(mem, CID, uds)
    g = Guest(dev, mem)
    ev = g.drv.queues[2]
    ev.add([], [4])
    g.drv.kick(2)
    dev.send_transport_reset()
    [(_, n, data)] = ev.wait(1)
    assert n == 4 and struct.unpack("<I", data)[0] == VS.EVENT_TRANSPORT_RESET
    dev.close()


def test_socket_path_checks(mem, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        VirtioVsock(mem, CID, str(tmp_path / "missing" / "v.sock"))
    with pytest.raises(ConfigError, match="CID"):
        VirtioVsock(mem, 2, str(tmp_path / "v.sock"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a socket"):
        VirtioVsock(mem, CID, str(tmp_path / "file"))
    live = VirtioVsock(mem, CID, str(tmp_path / "live.sock"))
    with pytest.raises(ConfigError, match="in use"):
        VirtioVsock(mem, CID, str(tmp_path / "live.sock"))
    live.close()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "stale.sock"))
    stale.close()                                   # file left behind, nobody listening
    VirtioVsock(mem, CID, str(tmp_path / "stale.sock")).close()


def test_guest_that_never_answers_is_timed_out(mem, uds):
    dev = VirtioVsock(mem, CID, uds, timeout=0.2)
    g = Guest(dev, mem)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(uds)
    c.sendall(b"CONNECT 9\n")
    p = g.expect(VS.OP_REQUEST)
    p = g.expect(VS.OP_RST, timeout=5)             # no RESPONSE: the device gives up
    assert p[3] == 9
    c.settimeout(5)
    assert c.recv(10) == b""
    assert dev.connections() == []
    dev.close()


def test_closed_host_socket_is_reset_if_guest_ignores_shutdown(mem, uds):
    dev = VirtioVsock(mem, CID, uds, timeout=0.2)
    g = Guest(dev, mem)
    srv = listener(f"{uds}_44")
    g.send(VS.OP_REQUEST, 4000, 44)
    g.expect(VS.OP_RESPONSE)
    host, _ = srv.accept()
    host.close()
    p = g.expect(VS.OP_SHUTDOWN)
    assert p[7] == VS.SHUTDOWN_RCV | VS.SHUTDOWN_SEND   # closed: nothing more either way
    g.expect(VS.OP_RST)                            # the guest never sent its RST
    assert dev.connections() == []
    dev.close()


def test_restore_sends_transport_reset(mem, uds):
    dev = VirtioVsock(mem, CID, uds)
    g = Guest(dev, mem)
    ev = g.drv.queues[2]
    ev.add([], [4])
    g.drv.kick(2)
    state = dev.state()
    dev.close()
    other = VirtioVsock(mem, CID, uds)
    VirtioMmioTransport(other)
    other.restore(state)
    [(_, n, data)] = ev.wait(1)
    assert struct.unpack("<I", data)[0] == VS.EVENT_TRANSPORT_RESET
    other.close()
