"""virtio on /dev/kvm: the freestanding drivers (guests/virtio_blk.c,
guests/virtio_rng.c, guests/virtio_vsock.c) against hvkit's devices over virtio-pci and
virtio-mmio, with the data checked in the guest and again by the host."""
from __future__ import annotations

import glob
import os
import socket
import struct
import threading

import pytest

from hvkit.errors import ConfigError
from hvkit.storage.raw import RawFileBackend

pytestmark = pytest.mark.kvm

PAGE = 4096
HC_RNG = 0x1402


def expected_page(page: int, seed: int = 0x5EED) -> bytes:
    return b"".join(struct.pack("<Q", ((page << 32) ^ ((i * 2654435761) & 0xFFFFFFFF)
                                       ^ seed) & 0xFFFFFFFFFFFFFFFF)
                    for i in range(0, PAGE, 8))


@pytest.fixture
def disk_path(tmp_path):
    path = str(tmp_path / "disk.img")
    RawFileBackend.create(path, 32 << 20).close()
    return path


@pytest.mark.parametrize("transport", ["pci", "mmio"])
@pytest.mark.parametrize("qd", [1, 32])
def test_blk_driver_writes_what_the_host_reads(microvm, disk_path, transport, qd):
    mmio = int(transport == "mmio")
    vm = microvm("virtio_blk", memory="64M", args=f"mmio={mmio} ios=128 qd={qd}")
    dev = vm.add_virtio_blk(disk_path, transport=transport)
    code = vm.run(timeout=120)
    out = vm.console_output.decode()
    assert code == 0, out
    assert f"virtio-blk: {'virtio-mmio' if mmio else 'virtio-pci'}" in out
    assert "id 'disk.img'" in out and "virtio-blk: ok" in out
    assert dev.completed[1] == 1          # only the read past the end failed
    vm.close()
    with open(disk_path, "rb") as f:      # the host sees the guest's data
        for page in (0, 17, 63, 100):
            f.seek(page * PAGE)
            assert f.read(PAGE) == expected_page(page), page
        f.seek(101 * PAGE)
        assert f.read(PAGE) == bytes(PAGE)    # write-zeroes


@pytest.mark.parametrize("transport", ["pci", "mmio"])
@pytest.mark.parametrize("qd", [1, 32])
def test_blk_native_engine_serves_the_guest(microvm, disk_path, transport, qd, monkeypatch):
    """The C queue engine (a raw-file disk) at queue depth 1 and 32:
    random pages written and every read checked in the guest, the pages
    checked again by the host, and the requests really served in C."""
    monkeypatch.setenv("HVKIT_VIRTIO_BLK_ENGINE", "native")
    mmio = int(transport == "mmio")
    vm = microvm("virtio_blk", memory="64M",
                 args=f"mmio={mmio} ios=512 qd={qd} bench=1 lbas=1024 seed=4242")
    dev = vm.add_virtio_blk(disk_path, transport=transport)
    vm.hypercalls.register(0x1401, lambda call: 0, "blk-bench-start")
    vm.hypercalls.register(0x1400, lambda call: 0, "blk-bench-result")
    code = vm.run(timeout=300)
    out = vm.console_output.decode()
    assert code == 0, out
    assert "virtio-blk: ok" in out
    native = dev.native
    vm.close()
    assert native is not None
    st = native.stats
    # set-up requests, then 256 writes and 256 reads, all answered by the engine
    assert st["ok"] >= 512 and st["ioerr"] == 1 and st["chain_errors"] == 0, st
    assert st["bytes_read"] >= 256 * PAGE and st["bytes_written"] >= 256 * PAGE, st
    if qd == 32:
        assert native.run_stats["max_pass"] > 1, native.run_stats
    rng, pages = 88172645463325252, set()
    for _ in range(256):                  # the guest's xorshift over its pages
        rng ^= (rng << 13) & 0xFFFFFFFFFFFFFFFF
        rng ^= rng >> 7
        rng ^= (rng << 17) & 0xFFFFFFFFFFFFFFFF
        pages.add(rng % 1024)
    with open(disk_path, "rb") as f:
        for page in sorted(pages)[:64]:
            f.seek(page * PAGE)
            assert f.read(PAGE) == expected_page(page, 4242), page


def test_blk_native_engine_hands_the_queue_back_on_every_pause(microvm, disk_path, monkeypatch):
    """Pausing the VM stops the C engine (what is in flight is answered and
    the positions go back to the Python queue, which a snapshot saves);
    resuming starts it again where it stood. Many pauses during a QD32 run:
    every pause shows a queue with nothing taken and unanswered, and the
    guest still reads back every page it wrote."""
    import time
    monkeypatch.setenv("HVKIT_VIRTIO_BLK_ENGINE", "native")
    vm = microvm("virtio_blk", memory="64M", args="ios=2048 qd=32 bench=1 lbas=1024")
    backend = RawFileBackend(disk_path)
    dev = vm.add_virtio_blk(backend, transport="pci", serial="disk.img")
    vm.hypercalls.register(0x1401, lambda call: 0, "blk-bench-start")
    vm.hypercalls.register(0x1400, lambda call: 0, "blk-bench-result")
    vm.start()
    pauses, moved = 0, set()
    while pauses < 200:
        time.sleep(0.002)
        try:
            vm.pause()
        except Exception:                 # the guest finished meanwhile
            break
        if vm.state != "paused":
            break
        pauses += 1
        assert not dev.native.running
        qs = dev.state()["queues"][0]
        assert qs["last_avail"] == qs["used_idx"], qs      # nothing left in flight
        moved.add(qs["used_idx"])
        vm.resume()
    assert vm.wait(300) == 0, vm.console_output.decode()
    assert "virtio-blk: ok" in vm.console_output.decode()
    vm.close()
    backend.close()
    assert pauses >= 3 and len(moved) >= 3, (pauses, moved)


@pytest.mark.parametrize("transport", ["pci", "mmio"])
def test_blk_notifications_skip_the_vmm(microvm, disk_path, transport):
    """Queue notifications go to the device through ioeventfds: the data
    phase adds no MMIO exits to the VMM."""
    mmio = int(transport == "mmio")
    counts = []
    for ios in (16, 256):
        vm = microvm("virtio_blk", memory="64M", args=f"mmio={mmio} ios={ios} qd=1")
        vm.add_virtio_blk(disk_path, transport=transport)
        assert vm.run(timeout=120) == 0, vm.console_output.decode()
        counts.append(vm.exit_counts().get("MMIO", 0))
        vm.close()
    assert counts[1] - counts[0] < 10, counts


@pytest.mark.parametrize("transport", ["pci", "pci-intx", "mmio"])
def test_blk_interrupt_reaches_the_guest(microvm, disk_path, transport):
    """MSI-X through an irqfd (PCI), INTx with the ISR register (PCI with
    MSI-X off) or the IOAPIC pin (MMIO) leaves the vector pending in the
    guest's local APIC."""
    mmio = int(transport == "mmio")
    intx = int(transport == "pci-intx")
    vm = microvm("virtio_blk", memory="64M", args=f"mmio={mmio} intx={intx} ios=16 irq=1")
    vm.add_virtio_blk(disk_path, transport=transport.split("-")[0])
    assert vm.run(timeout=120) == 0, vm.console_output.decode()
    assert "interrupt delivered" in vm.console_output.decode()


def test_read_only_disk_refuses_writes(microvm, disk_path):
    with open(disk_path, "r+b") as f:
        f.write(b"keep")
    vm = microvm("virtio_blk", memory="64M")
    dev = vm.add_virtio_blk(disk_path, read_only=True)
    assert vm.run(timeout=60) == 0, vm.console_output.decode()
    assert "read-only ok" in vm.console_output.decode()
    assert dev.read_only
    vm.close()
    with open(disk_path, "rb") as f:
        assert f.read(4) == b"keep"


@pytest.mark.parametrize("transport", ["pci", "mmio"])
def test_rng_gives_random_bytes(microvm, transport):
    got: list[bytes] = []
    vm = microvm("virtio_rng", memory="64M",
                 args=f"mmio={int(transport == 'mmio')} bytes=256 rounds=4 irq=1")

    def report(call):
        addr, length = call.args[0], call.args[1]
        got.append(vm.memory.read(addr, length))
        return 0

    vm.hypercalls.register(HC_RNG, report, "virtio-rng-test")
    vm.add_virtio_rng(transport=transport)
    assert vm.run(timeout=60) == 0, vm.console_output.decode()
    assert "interrupt delivered" in vm.console_output.decode()
    assert len(got) == 1 and len(got[0]) == 1024
    data = got[0]
    assert len(set(data)) > 128           # 1 KiB of getrandom bytes, not a pattern
    assert data[:256] != data[256:512]


def test_bad_devices_are_refused_before_the_vm_runs(microvm, tmp_path, disk_path):
    vm = microvm("hello", memory="64M")
    with pytest.raises(ConfigError, match="does not exist"):
        vm.add_virtio_blk(str(tmp_path / "missing.img"))
    with pytest.raises(ConfigError, match="does not exist"):
        vm.add_virtio_vsock(3, str(tmp_path / "no" / "such" / "v.sock"))
    vm.add_virtio_blk(disk_path, slot=3)
    with pytest.raises(ConfigError, match="taken"):
        vm.add_virtio_rng(slot=3)
    vm.add_virtio_rng(transport="mmio", slot=0)
    with pytest.raises(ConfigError, match="taken"):
        vm.add_virtio_rng(transport="mmio", slot=0)
    with pytest.raises(ConfigError, match="transport"):
        vm.add_virtio_rng(transport="usb")
    assert vm.run(timeout=10) == 0        # the VM is none the worse
    with pytest.raises(ConfigError, match="before the VM starts"):
        vm.add_virtio_rng()


def test_mmio_devices_are_declared_on_the_linux_command_line(microvm, tmp_path):
    """A Linux VM learns of virtio-mmio devices from its command line;
    hvkit adds the token when the device is added (no boot needed)."""
    from hvkit.boot.layout import CMDLINE_ADDR
    candidates = [os.path.join(os.environ.get("HVKIT_LINUX_DIR", ""), "vmlinux")]
    candidates += sorted(glob.glob("/boot/vmlinuz-*"))
    kernel = next((k for k in candidates if os.path.isfile(k)), None)
    if kernel is None:
        pytest.skip("no Linux kernel here (HVKIT_LINUX_DIR or /boot/vmlinuz-*)")
    vm = microvm(kernel=kernel, memory="128M", cmdline="console=ttyS0")
    vm.add_virtio_rng(transport="mmio")
    vm.add_virtio_rng(transport="mmio")
    assert vm.cmdline.endswith("virtio_mmio.device=4K@0xd0000000:5 "
                               "virtio_mmio.device=4K@0xd0001000:6")
    raw = vm.memory.read(CMDLINE_ADDR, len(vm.cmdline) + 1)
    assert raw == vm.cmdline.encode() + b"\0"


@pytest.mark.parametrize("transport", ["pci", "mmio"])
def test_vsock_guest_reaches_a_host_unix_socket(microvm, tmp_path, transport):
    """The guest connects to host port 1234: Firecracker's model puts it
    through to ``<uds>_1234``, where a host server answers every message."""
    uds = str(tmp_path / "v.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(uds + "_1234")
    srv.listen(1)
    srv.settimeout(60)
    heard = []

    def serve():
        conn, _ = srv.accept()
        with conn:
            while data := conn.recv(4096):
                heard.append(data)
                conn.sendall(data.upper())

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    vm = microvm("virtio_vsock", memory="64M",
                 args=f"mmio={int(transport == 'mmio')} port=1234 rounds=8")
    vm.add_virtio_vsock(3, uds, transport=transport)
    assert vm.run(timeout=120) == 0, vm.console_output.decode()
    server.join(10)
    srv.close()
    assert b"".join(heard) == b"".join(b"ping %d" % i for i in range(8))
    assert "8 messages echoed by the host" in vm.console_output.decode()


@pytest.mark.parametrize("transport", ["pci", "mmio"])
def test_vsock_host_reaches_a_guest_listener(microvm, tmp_path, transport):
    """A host process connects to ``<uds>``, writes ``CONNECT 5555``, gets
    ``OK <port>`` and talks to the guest's listener."""
    uds = str(tmp_path / "v.sock")
    vm = microvm("virtio_vsock", memory="64M",
                 args=f"mmio={int(transport == 'mmio')} listen=5555")
    vm.add_virtio_vsock(3, uds, transport=transport)
    vm.start()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(60)
        c.connect(uds)
        c.sendall(b"CONNECT 5555\n")
        line = b""
        while not line.endswith(b"\n"):
            line += c.recv(1)
        assert line.startswith(b"OK ")
        c.sendall(b"hello guest")
        echo = b""
        while len(echo) < 11:
            echo += c.recv(64)
        assert echo == b"hello guest"
    assert vm.wait(60) == 0, vm.console_output.decode()
    assert "echoed 11 bytes to the host" in vm.console_output.decode()


def test_net_tap_lives_and_dies_with_the_vm(microvm):
    """add_virtio_net() makes a tap of its own, configured as asked, refuses
    an interface that exists, and leaves nothing behind when the VM closes."""
    from hvkit.net.tap import tun_available
    why = tun_available()
    if why:
        pytest.skip(f"no taps here: {why}")
    vm = microvm("hello", memory="64M")
    net = vm.add_virtio_net(transport="mmio", mac="52:54:00:12:34:56", mtu=1400)
    name = net.backend.name
    assert os.path.exists(f"/sys/class/net/{name}")
    with open(f"/sys/class/net/{name}/mtu") as f:
        assert f.read().strip() == "1400"
    assert net.mac == bytes.fromhex("525400123456")
    with pytest.raises(ConfigError, match="already exists"):
        vm.add_virtio_net(name)
    assert vm.run(timeout=10) == 0
    vm.close()
    assert not os.path.exists(f"/sys/class/net/{name}")


@pytest.mark.parametrize("transport", ["pci", "mmio"])
def test_console_carries_lines_both_ways(microvm, transport):
    """virtio-console: the guest's output arrives whole, input typed on the
    host reaches the guest, with no VM exit per byte."""
    vm = microvm("virtio_console", memory="64M", args=f"mmio={int(transport == 'mmio')}")
    con = vm.add_virtio_console(transport=transport)
    vm.start()
    assert con.wait_output(b"hello from the guest over virtio-console\n", 60), con.output
    assert con.send_input(b"first line\nsecond") == 17
    assert con.wait_output(b"echo: first line\n", 60), con.output
    con.send_input(b" half\nquit\n")
    assert vm.wait(60) == 0, vm.console_output.decode()
    assert bytes(con.output).endswith(b"echo: second half\nbye\n")
    assert vm.exit_counts().get("MMIO", 0) < 60          # set-up only, not per byte
