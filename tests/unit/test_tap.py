"""Real tap devices through pyroute2 (root and /dev/net/tun), and virtio-net on one."""
from __future__ import annotations

import os
import select
import socket
import time
import uuid

import pytest

from hvkit.devices.virtio.driver import MmioDriver
from hvkit.devices.virtio.mmio import VirtioMmioTransport
from hvkit.devices.virtio.net import VirtioNet
from hvkit.errors import ConfigError
from hvkit.memory.guest import GuestMemory
from hvkit.net import tap as T
from hvkit.net.tap import Tap, remove_stale, tun_available

pyroute2 = pytest.importorskip("pyroute2")
_why = tun_available()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"no taps here: {_why}")

FRAME = bytes.fromhex("ffffffffffff" "021122334455" "88b5") + b"hvkit tap test".ljust(46, b".")


def link_exists(name, netns=None):
    return T._exists(name, netns)


def unique(prefix="hvt"):
    return prefix + uuid.uuid4().hex[:8]


def packet_socket(ifname):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    s.bind((ifname, 0))
    s.settimeout(5)
    return s


def test_create_configure_remove():
    name = unique()
    tap = Tap.create(name, mtu=1400, mac="02:12:34:56:78:9a")
    try:
        info = tap.info()
        assert info["mtu"] == 1400 and info["mac"] == "02:12:34:56:78:9a"
        assert info["state"] in ("UP", "UNKNOWN")
        with open(f"/sys/class/net/{name}/tun_flags") as f:
            flags = int(f.read(), 16)
        assert flags & T.IFF_VNET_HDR and flags & T.IFF_NO_PI and not flags & T.IFF_PERSIST
    finally:
        tap.close()
    assert not link_exists(name)


def test_frame_written_to_the_tap_reaches_the_host():
    with Tap.create(unique()) as tap:
        sniff = packet_socket(tap.name)
        before = tap.info()["rx_packets"]
        os.write(tap.fd, bytes(T.VNET_HDR_SIZE) + FRAME)
        deadline = time.monotonic() + 5
        while True:
            data = sniff.recv(2048)
            if data[12:14] == b"\x88\xb5":
                break
            assert time.monotonic() < deadline
        assert data == FRAME
        assert tap.info()["rx_packets"] >= before + 1
        sniff.close()


def test_frame_sent_by_the_host_is_read_with_a_vnet_header():
    with Tap.create(unique()) as tap:
        sender = packet_socket(tap.name)
        sender.send(FRAME)
        deadline = time.monotonic() + 5
        while True:
            select.select([tap.fd], [], [], 5)
            data = os.read(tap.fd, 65536)
            if data[T.VNET_HDR_SIZE + 12:T.VNET_HDR_SIZE + 14] == b"\x88\xb5":
                break
            assert time.monotonic() < deadline
        assert data[T.VNET_HDR_SIZE:] == FRAME
        sender.close()


def test_offload_ioctl():
    with Tap.create(unique()) as tap:
        tap.set_offload(T.TUN_F_CSUM | T.TUN_F_TSO4 | T.TUN_F_TSO6)
        tap.set_offload(0)
        assert tap.offload == 0


def test_existing_name_and_bad_arguments_refused():
    with pytest.raises(ConfigError, match="already exists"):
        Tap.create("lo")
    with pytest.raises(ConfigError):
        Tap.create("x" * 16)
    with pytest.raises(ConfigError):
        Tap.create(unique(), mtu=10)
    with pytest.raises(ConfigError):
        Tap.create(unique(), mac="nope")
    with pytest.raises(ConfigError, match="bridge"):
        Tap.create(unique(), bridge=unique("nobr"))
    with pytest.raises(ConfigError, match="namespace"):
        Tap.create(unique(), netns=unique("nons"))


def test_bridge():
    from pyroute2 import IPRoute
    br = unique("hvbr")
    with IPRoute() as ipr:
        ipr.link("add", ifname=br, kind="bridge")
        br_index = ipr.link_lookup(ifname=br)[0]
    try:
        name = unique()
        with Tap.create(name, bridge=br) as tap:
            assert tap.info()["master"] == br_index
        assert not link_exists(name)
    finally:
        with IPRoute() as ipr:
            ipr.link("del", index=br_index)


def test_network_namespace():
    from pyroute2 import netns
    ns = unique("hvns")
    netns.create(ns)
    try:
        name = unique()
        with Tap.create(name, netns=ns, mtu=9000) as tap:
            assert not link_exists(name)
            assert link_exists(name, ns)
            assert tap.info()["mtu"] == 9000
        assert not link_exists(name, ns)
    finally:
        netns.remove(ns)


def test_stale_persistent_tap_is_removed():
    from pyroute2 import IPRoute
    name = unique(T.PREFIX + "s")[:15]
    with IPRoute() as ipr:
        ipr.link("add", ifname=name, kind="tuntap", mode="tap")
    assert link_exists(name)
    live = Tap.create()
    try:
        assert live.name.startswith(T.PREFIX)
        removed = remove_stale()
        assert name in removed and live.name not in removed
        assert not link_exists(name) and link_exists(live.name)
    finally:
        live.close()


def test_virtio_net_on_a_real_tap():
    mem = GuestMemory.create(8 << 20)
    tap = Tap.create(unique())
    name = tap.name
    dev = VirtioNet(mem, tap)
    try:
        drv = MmioDriver(VirtioMmioTransport(dev), mem)
        drv.setup()
        rx, tx = drv.queues[0], drv.queues[1]
        for _ in range(16):
            rx.add([], [65562])
        drv.kick(0)
        sniff = packet_socket(name)
        tx.add([bytes(12), FRAME])
        drv.kick(1)
        deadline = time.monotonic() + 5
        while sniff.recv(2048) != FRAME:
            assert time.monotonic() < deadline
        sniff.send(FRAME[::-1][:12] + b"\x88\xb5" + b"back to the guest".ljust(46, b"!"))
        deadline = time.monotonic() + 5
        found = None
        while found is None:
            for _, n, data in rx.wait(1):      # the host may send its own frames too
                if data[12 + 12:12 + 14] == b"\x88\xb5":
                    found = data
            assert time.monotonic() < deadline
        assert found[12 + 14:].startswith(b"back to the guest")
        sniff.close()
    finally:
        dev.close()
        mem.close()
    assert not link_exists(name)


def test_bridge_with_address_and_a_tap():
    from hvkit.net import bridge as B
    with B.Bridge.create(address="10.213.7.1/24") as br:
        from pyroute2 import IPRoute
        with IPRoute() as ipr:
            addrs = [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=br.index)]
            alias = ipr.get_links(br.index)[0].get_attr("IFLA_IFALIAS")
        assert "10.213.7.1" in addrs and alias == f"hvkit pid={os.getpid()}"
        with Tap.create(bridge=br.name) as tap:
            assert br.ports() == [tap.name]
        assert br.ports() == []
        name = br.name
    assert not link_exists(name)
    with pytest.raises(ConfigError):
        B.Bridge.create("lo")
    with pytest.raises(ConfigError):
        B.Bridge.create(address="10.0.0.300/24")


def test_stale_bridge_of_a_dead_owner_is_removed():
    import subprocess
    import sys
    from hvkit.net import bridge as B
    out = subprocess.run([sys.executable, "-c",
                          "from hvkit.net.bridge import Bridge; print(Bridge.create().name)"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert link_exists(out)                       # its owner exited without closing it
    with B.Bridge.create() as mine:
        removed = B.remove_stale()
        assert out in removed and mine.name not in removed
        assert link_exists(mine.name)
    assert not link_exists(out)
