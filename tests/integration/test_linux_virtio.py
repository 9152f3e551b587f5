"""Linux's own virtio drivers on hvkit's devices, on the real /dev/kvm.

One boot of the hvkit guest kernel with every device attached, the disk
and the network card on virtio-pci, the console, vsock and rng on
virtio-mmio, so both transports run under Linux. Its /init runs each check
in turn while a host thread plays the other side when the guest says it
is ready:

- virtio-blk: mke2fs, mount, write a file, unmount, mount again and read it
  back; after the VM is gone the host reads the file out of the image with
  debugfs.
- virtio-net: the kernel configures eth0 from ``ip=``; the guest sends data
  over TCP to a host server on the tap's address, and a host client sends
  data to a guest server (``nc -l -e cat``) and gets it back.
- virtio-vsock: a guest client (hvkit-vsock) reaches a host UNIX socket
  ``<uds>_5000``; a host client writes ``CONNECT 6000`` to ``<uds>`` and
  reaches a guest echo server.
- virtio-console: /dev/console is hvc0; init's output comes out of the
  virtio console and not the serial port, and a line typed into it
  reaches the shell.
- virtio-rng: /dev/hwrng is backed by virtio_rng.

Each test asserts one of those on the recorded run. A Linux boot takes a
minute or two where kernel code is emulated (nested PVM hosts), hence one.
"""
import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from hvkit.boot.initramfs import busybox_initramfs, init_script
from hvkit.errors import GuestTimeout

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

BOOT_TIMEOUT = 900
HOST_IP = "10.231.77.1"
GUEST_IP = "10.231.77.2"
TCP_HOST_PORT = 7000       # host server, guest client
TCP_GUEST_PORT = 7001      # guest server, host client
VSOCK_HOST_PORT = 5000     # host UNIX socket <uds>_5000, guest client
VSOCK_GUEST_PORT = 6000    # guest echo server, host client through <uds>
GUEST_CID = 3
DISK_SIZE = 32 << 20
# The file the guest writes through virtio-blk, 3000 lines (~80 KiB: past
# ext2's direct blocks, so indirect blocks are written too).
BLK_LINES = 3000
NET_LINES = 4000           # guest -> host over TCP (~20 KiB)
VSOCK_LINES = 5000         # guest -> host over vsock (~25 KiB)
PAYLOAD = bytes((i * 7 + 3) & 0xFF for i in range(96 << 10))   # host -> guest, echoed
CONSOLE_LINE = "typed-into-the-virtio-console"

GUEST_CHECKS = [
    # kernel messages would interleave with the results on hvc0; dmesg keeps them
    "dmesg -n 1",
    "echo CONSOLE-ACTIVE=$(cat /sys/class/tty/console/active)",
    # virtio-rng
    "echo RNG-CURRENT=$(cat /sys/class/misc/hw_random/rng_current)",
    "echo RNG-A=$(head -c 32 /dev/hwrng | hexdump -v -e '/1 \"%02x\"')",
    "echo RNG-B=$(head -c 32 /dev/hwrng | hexdump -v -e '/1 \"%02x\"')",
    # virtio-blk: a file system made, written, unmounted and read back
    "mkdir -p /mnt",
    "mke2fs -q /dev/vda; echo BLK-MKFS-RC=$?",
    "mount -t ext2 /dev/vda /mnt; echo BLK-MOUNT-RC=$?",
    f"seq 1 {BLK_LINES} | sed 's/^/hvkit-virtio-blk-line-/' > /mnt/data.txt",
    "sync; umount /mnt; echo BLK-UMOUNT-RC=$?",
    "echo 3 > /proc/sys/vm/drop_caches",
    "mount -t ext2 -o ro /dev/vda /mnt",
    "echo BLK-READ=$(md5sum < /mnt/data.txt) $(wc -l < /mnt/data.txt)",
    "umount /mnt",
    # virtio-vsock: guest client to the host, then a guest server for the host
    f"echo VSOCK-TO-HOST=$(seq 1 {VSOCK_LINES} | hvkit-vsock connect 2 {VSOCK_HOST_PORT})",
    f"timeout 120 hvkit-vsock echo {VSOCK_GUEST_PORT}; echo VSOCK-ECHO-RC=$?",
    # virtio-net: eth0 was configured by the kernel from ip=
    "echo NET-ADDR=$(ip -4 -o addr show eth0)",
    f"echo NET-TO-HOST=$(seq 1 {NET_LINES} | timeout 120 nc {HOST_IP} {TCP_HOST_PORT})",
    f"timeout 120 nc -l -p {TCP_GUEST_PORT} -e /bin/cat & nc_pid=$!",
    "echo NET-LISTENING",
    "wait $nc_pid; echo NET-SERVER-RC=$?",
    # virtio-console input
    "echo CONSOLE-READY",
    "read -r line; echo CONSOLE-GOT=$line",
    "echo NET-STATS=$(cat /sys/class/net/eth0/statistics/rx_packets)"
    " $(cat /sys/class/net/eth0/statistics/tx_packets)",
    "dmesg | grep -iE 'virtio|vsock|hwrng|eth0|vda|hvc|error|fail|warn' | tail -40",
    "echo CHECKS-DONE",
    "rc=0",
]


def _lines(n: int, prefix: str = "") -> bytes:
    return "".join(f"{prefix}{i}\n" for i in range(1, n + 1)).encode()


def _recv_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while True:
        data = sock.recv(65536)
        if not data:
            return bytes(out)
        out += data


def _digest_reply(data: bytes) -> bytes:
    return b"got %d %s" % (len(data), hashlib.md5(data).hexdigest().encode())


class HostSide:
    """The host's half of every check, on threads; what it saw, in ``seen``."""

    def __init__(self, uds: str) -> None:
        self.uds = uds
        self.seen: dict[str, object] = {}
        self.errors: list[str] = []
        self.threads: list[threading.Thread] = []
        self.vsock_server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.vsock_server.bind(f"{uds}_{VSOCK_HOST_PORT}")
        self.vsock_server.listen(1)
        self.vsock_server.settimeout(BOOT_TIMEOUT)
        self.tcp_server: socket.socket | None = None

    def listen_tcp(self) -> None:
        """After the tap has its address."""
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((HOST_IP, TCP_HOST_PORT))
        s.listen(1)
        s.settimeout(BOOT_TIMEOUT)
        self.tcp_server = s

    def _spawn(self, name: str, fn, *args) -> None:
        def run() -> None:
            try:
                fn(*args)
            except Exception as exc:  # recorded, asserted by the tests
                self.errors.append(f"{name}: {exc!r}")
        t = threading.Thread(target=run, name=name, daemon=True)
        t.start()
        self.threads.append(t)

    def start(self, vm, console) -> None:
        self._spawn("vsock-server", self._serve, self.vsock_server, "vsock_from_guest")
        self._spawn("tcp-server", self._serve, self.tcp_server, "tcp_from_guest")
        self._spawn("driver", self._drive, vm, console)

    def _serve(self, server: socket.socket, key: str) -> None:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(300)
            data = _recv_all(conn)
            self.seen[key] = data
            conn.sendall(_digest_reply(data))

    def _wait(self, vm, console, needle: bytes, deadline: float) -> bool:
        while time.monotonic() < deadline and not vm.finished.is_set():
            if console.wait_output(needle, 1.0):
                return True
        return needle in console.output

    def _drive(self, vm, console) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT
        steps = [(b"HVKIT-INIT-OK", None),
                 (b"listening on %d" % VSOCK_GUEST_PORT, self._vsock_echo),
                 (b"NET-LISTENING", lambda: self._tcp_echo(deadline)),
                 (b"CONSOLE-READY", lambda: console.send_input((CONSOLE_LINE + "\n").encode())),
                 (b"CHECKS-DONE", None)]
        for needle, act in steps:
            if not self._wait(vm, console, needle, deadline):
                return
            at = time.monotonic() - vm.started_at
            self.seen[needle.decode()] = at
            print(f"linux-virtio: {needle.decode()} at {at:.1f} s", file=sys.stderr)
            if act is not None:
                self.seen[needle.decode() + " answer"] = act()

    def _vsock_echo(self) -> tuple[bytes, bytes]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(300)
            s.connect(self.uds)
            s.sendall(b"CONNECT %d\n" % VSOCK_GUEST_PORT)
            line = b""
            while not line.endswith(b"\n"):
                data = s.recv(1)
                if not data:
                    break
                line += data
            s.sendall(PAYLOAD)
            s.shutdown(socket.SHUT_WR)
            return line, _recv_all(s)

    def _tcp_echo(self, deadline: float) -> bytes:
        # "NET-LISTENING" comes as nc starts: it may not listen yet
        while True:
            try:
                s = socket.create_connection((GUEST_IP, TCP_GUEST_PORT), timeout=30)
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        with s:
            s.settimeout(300)
            s.sendall(PAYLOAD)
            s.shutdown(socket.SHUT_WR)
            return _recv_all(s)

    def close(self) -> None:
        self.vsock_server.close()
        if self.tcp_server is not None:
            self.tcp_server.close()


def _result(out: str, key: str) -> str | None:
    m = re.search(rf"^{re.escape(key)}=(.*?)\r?$", out, re.M)
    return m.group(1).strip() if m else None


@pytest.fixture(scope="module")
def run(kernel_dir, tmp_path_factory):
    """Boot once with every device, run the checks, and return what both
    sides saw."""
    from pyroute2 import IPRoute

    from hvkit import MicroVM
    from hvkit.net.tap import tun_available
    why = tun_available()
    if why:
        pytest.skip(f"virtio-net needs a tap: {why}")
    tmp = tmp_path_factory.mktemp("linux-virtio")
    disk = str(tmp / "disk.img")
    with open(disk, "wb") as f:
        f.truncate(DISK_SIZE)
    uds = str(tmp / "v.sock")
    host = HostSide(uds)
    text = init_script(commands=GUEST_CHECKS, run_cmdline_arg=None)
    cmdline = (f"console=ttyS0 console=hvc0 reboot=k panic=-1 "
               f"ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off")
    vm = MicroVM(kernel=os.path.join(kernel_dir, "vmlinux"),
                 initrd=busybox_initramfs(init_script_text=text),
                 cmdline=cmdline, memory="256M")
    try:
        vm.add_virtio_blk(disk, transport="pci")
        net = vm.add_virtio_net(transport="pci")
        console = vm.add_virtio_console(transport="mmio")
        vm.add_virtio_vsock(GUEST_CID, uds, transport="mmio")
        vm.add_virtio_rng(transport="mmio")
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=net.backend.name)[0]
            ipr.addr("add", index=idx, address=HOST_IP, prefixlen=24)
        host.listen_tcp()
        start = time.monotonic()
        vm.start()
        host.start(vm, console)
        try:
            code = vm.wait(BOOT_TIMEOUT)
        except GuestTimeout:
            code = "timeout"
        elapsed = time.monotonic() - start
        for t in host.threads:
            t.join(5)
        result = {
            "code": code, "elapsed": elapsed, "serial": vm.console_output.decode(errors="replace"),
            "console": console.output.decode(errors="replace"), "host": host.seen,
            "host_errors": host.errors, "disk": disk,
        }
    finally:
        vm.close()
        host.close()
    print(f"linux-virtio: init marker at {result['host'].get('HVKIT-INIT-OK')} s, "
          f"whole run {result['elapsed']:.1f} s, load {os.getloadavg()}", file=sys.stderr)
    return result


def _context(run) -> str:
    return (f"exit {run['code']}; host errors {run['host_errors']}\n--- virtio console:\n"
            + run["console"][-3000:] + "\n--- serial:\n" + run["serial"][-1500:])


def test_the_guest_ran_every_check(run):
    assert run["code"] == 0, _context(run)
    assert "CHECKS-DONE" in run["console"], _context(run)


def test_virtio_console_carries_the_console(run):
    """/dev/console is hvc0 on virtio-mmio: init's output arrives there and
    not on the serial port, and typed input reaches the shell."""
    out = run["console"]
    assert "HVKIT-INIT-OK" in out, _context(run)
    assert "HVKIT-INIT-OK" not in run["serial"]
    assert (_result(out, "CONSOLE-ACTIVE") or "").split()[-1:] == ["hvc0"], _context(run)
    assert _result(out, "CONSOLE-GOT") == CONSOLE_LINE, _context(run)


def test_virtio_rng_feeds_hwrng(run):
    out = run["console"]
    assert _result(out, "RNG-CURRENT") == "virtio_rng.0", _context(run)
    a, b = _result(out, "RNG-A"), _result(out, "RNG-B")
    assert a and b and re.fullmatch(r"[0-9a-f]{64}", a) and re.fullmatch(r"[0-9a-f]{64}", b), \
        _context(run)
    assert a != b and a != "0" * 64


def test_virtio_blk_ext2_written_by_linux_read_by_the_host(run):
    out = run["console"]
    expected = _lines(BLK_LINES, "hvkit-virtio-blk-line-")
    for step in ("BLK-MKFS-RC", "BLK-MOUNT-RC", "BLK-UMOUNT-RC"):
        assert _result(out, step) == "0", _context(run)
    md5, _, count = (_result(out, "BLK-READ") or "").partition(" ")
    assert md5.split()[0:1] == [hashlib.md5(expected).hexdigest()], _context(run)
    assert count.split()[-1:] == [str(BLK_LINES)]
    debugfs = shutil.which("debugfs") or "/sbin/debugfs"
    if not os.path.exists(debugfs):
        pytest.skip("debugfs (e2fsprogs) is missing: the host cannot read the ext2 image")
    got = subprocess.run([debugfs, "-R", "cat /data.txt", run["disk"]],
                         capture_output=True, timeout=60)
    assert got.stdout == expected, got.stderr.decode()[-500:]


def test_virtio_net_tcp_both_ways_through_the_tap(run):
    out = run["console"]
    assert f"inet {GUEST_IP}/24" in (_result(out, "NET-ADDR") or ""), _context(run)
    sent = _lines(NET_LINES)
    assert run["host"].get("tcp_from_guest") == sent, _context(run)
    assert _result(out, "NET-TO-HOST") == _digest_reply(sent).decode(), _context(run)
    echoed = run["host"].get("NET-LISTENING answer")
    assert echoed is not None and len(echoed) == len(PAYLOAD), _context(run)
    assert echoed == PAYLOAD
    assert _result(out, "NET-SERVER-RC") == "0", _context(run)


def test_virtio_vsock_guest_reaches_host_unix_socket(run):
    sent = _lines(VSOCK_LINES)
    assert run["host"].get("vsock_from_guest") == sent, _context(run)
    assert _result(run["console"], "VSOCK-TO-HOST") == _digest_reply(sent).decode(), \
        _context(run)


def test_virtio_vsock_host_reaches_guest_server(run):
    line, echoed = run["host"].get(f"listening on {VSOCK_GUEST_PORT} answer", (b"", b""))
    assert re.fullmatch(rb"OK \d+\n", line), _context(run)
    assert len(echoed) == len(PAYLOAD) and echoed == PAYLOAD, _context(run)
    assert _result(run["console"], "VSOCK-ECHO-RC") == "0", _context(run)
