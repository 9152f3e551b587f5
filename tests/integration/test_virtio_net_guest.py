"""virtio-net on /dev/kvm: the freestanding driver (guests/virtio_net.c)
against hvkit's device on a real tap, over virtio-pci and virtio-mmio. A
host packet socket bound to the tap sees the guest's frames and sends the
guest frames of its own; both sides check every byte."""
from __future__ import annotations

import os
import socket
import struct
import time

import pytest

pytestmark = pytest.mark.kvm

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
GUEST_MAC = bytes.fromhex("525400abcdef")
BROADCAST = b"\xff" * 6
ETH_TX, ETH_RX, ETH_ECHO = 0x88B5, 0x88B6, 0x88B7


def frame_len(seq: int) -> int:
    """The guest's frame sizes (guests/virtio_net.c frame_len)."""
    return 60 + (seq * 97) % (1514 - 60 + 1)


def payload(seq: int, length: int) -> bytes:
    """Bytes after the Ethernet header of frame ``seq`` (guests/virtio_net.c fill)."""
    return struct.pack("<II", seq, length) + bytes((seq * 7 + i) & 0xFF
                                                   for i in range(8, length - 14))


@pytest.fixture
def tap_available():
    from hvkit.net.tap import tun_available
    why = tun_available()
    if why:
        pytest.skip(f"no taps here: {why}")


def packet_socket(ifname: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((ifname, 0))
    s.settimeout(60)
    return s


def quiet(ifname: str) -> None:
    """No IPv6 on the tap: the host kernel then sends the guest nothing of its own."""
    path = f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"
    if os.path.exists(path):
        with open(path, "w") as f:
            f.write("1")


def next_frame(s: socket.socket, ethertype: int, deadline: float) -> bytes:
    """The next frame of ``ethertype`` that came in from the tap (the guest)."""
    while time.monotonic() < deadline:
        data, addr = s.recvfrom(65536)
        if addr[2] != PACKET_OUTGOING and data[12:14] == struct.pack(">H", ethertype):
            return data
    raise AssertionError(f"no frame of type {ethertype:#x} from the guest in time")


@pytest.mark.parametrize("transport", ["pci", "mmio"])
def test_net_frames_cross_a_real_tap_both_ways(microvm, tap_available, transport):
    """The guest sends 24 frames of known content (60..1514 bytes) that a
    host packet socket on the tap receives whole and in order; the host
    then sends 16 frames that the guest checks and sends back."""
    ntx, nrx = 24, 16
    vm = microvm("virtio_net", memory="64M",
                 args=f"mmio={int(transport == 'mmio')} tx={ntx} rx={nrx}")
    net = vm.add_virtio_net(transport=transport, mac=GUEST_MAC.hex(":"))
    tap = net.backend.name
    quiet(tap)
    with open(f"/sys/class/net/{tap}/address") as f:
        host_mac = bytes.fromhex(f.read().strip().replace(":", ""))
    with packet_socket(tap) as s:
        vm.start()
        deadline = time.monotonic() + 120
        for seq in range(ntx):
            frame = next_frame(s, ETH_TX, deadline)
            n = frame_len(seq)
            assert len(frame) == n, seq
            assert frame[:6] == BROADCAST and frame[6:12] == GUEST_MAC
            assert frame[14:] == payload(seq, n), seq
        for seq in range(nrx):
            n = frame_len(seq)              # the sizes the guest expects
            out = GUEST_MAC + host_mac + struct.pack(">H", ETH_RX) + payload(seq, n)
            s.send(out)
            echo = next_frame(s, ETH_ECHO, deadline)
            assert echo[:6] == host_mac and echo[6:12] == GUEST_MAC
            assert echo[14:] == out[14:], seq
    assert vm.wait(60) == 0, vm.console_output.decode()
    out = vm.console_output.decode()
    assert f"sent {ntx} frames, {nrx} from the host checked and echoed" in out
    assert f"virtio-{'mmio' if transport == 'mmio' else 'pci'}" in out
    assert "52:54:00:ab:cd:ef link up" in out
    assert net.stats["tx_packets"] == ntx + nrx
    assert net.stats["rx_packets"] >= nrx
    assert net.stats["tx_dropped"] == 0


def test_net_bench_mode_puts_every_frame_on_the_tap(microvm, tap_available):
    """bench=1 streams frames as fast as the ring takes them: every one
    reaches the tap (the interface's own receive counter) and the guest's
    report names them all."""
    reports = []
    vm = microvm("virtio_net", memory="64M", args="bench=1 tx=2000 size=1000")
    vm.hypercalls.register(0x1411, lambda call: 0, "net-bench-start")
    vm.hypercalls.register(0x1410, lambda call: reports.append(call.args) or 0,
                           "net-bench-result")
    net = vm.add_virtio_net()
    tap = net.backend.name
    quiet(tap)

    def counter(what: str) -> int:
        with open(f"/sys/class/net/{tap}/statistics/{what}") as f:
            return int(f.read())

    before = counter("rx_packets"), counter("rx_bytes")
    assert vm.run(timeout=120) == 0, vm.console_output.decode()
    frames, nbytes, cycles = reports[0][:3]
    assert (frames, nbytes) == (2000, 2000 * 1000) and cycles > 0
    assert counter("rx_packets") - before[0] == 2000
    assert counter("rx_bytes") - before[1] == 2000 * 1000
    assert net.stats["tx_packets"] == 2000 and net.stats["tx_bytes"] == 2000 * 1000
