"""virtio-vsock: messages/s and MB/s between the guest and a host process,
against two host processes doing the same transfer over a UNIX socket
pair, in one run.

    python benchmarks/vsock.py [--rounds 2000] [--msg 64] [--mib 16] [--chunk 4096]
                               [--repeat 3] [--transports pci mmio] [-o out.json]

The guest (guests/virtio_vsock.c, bench=1) connects to host port 1234,
which hvkit's virtio-vsock puts through to the UNIX socket ``<uds>_1234``
(Firecracker's model). There a peer process (this script, --peer) serves
three phases, each timed by the guest's TSC:

- round trips: --rounds messages of --msg bytes, each echoed by the peer
  before the next is sent (messages/s, latency-bound);
- guest->host: --mib MiB in --chunk-byte packets, checked by the peer,
  which answers one byte once it has all of it (MB/s);
- host->guest: told to go, the peer sends --mib MiB, checked by the
  guest (MB/s).

The baseline runs the same peer on one end of a ``socketpair(AF_UNIX,
SOCK_STREAM)`` and a second host process in the guest's place on the other
end, sending in the same --chunk sizes and checking the same bytes: the
same transfer with no VM in the way. Both clocks start once the peer
process is up (its start-up is not measured). Each scenario runs --repeat times,
interleaved; the JSON has every run, medians, the ratios of the guest's
medians to the baseline's, and the load (load average before and after
each run, the CPUs' busy share). The host is shared: compare ratios, not
absolutes.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from hvkit.machine import MicroVM

from benchlib import Load, emit, tsc_hz

HC_RESULT, HC_START = 0x1420, 0x1421
PORT = 1234
METRICS = ("messages_per_s", "g2h_mb_per_s", "h2g_mb_per_s")


def pattern(length: int) -> bytes:
    """Stream bytes: offset o holds o % 251 (guests/virtio_vsock.c stream_byte)."""
    reps = length // 251 + 2
    return bytes(range(251)) * reps


def recv_exact(sock: socket.socket, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        data = sock.recv(min(n - got, 1 << 16))
        if not data:
            raise ConnectionError(f"peer closed after {got} of {n} bytes")
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def check_stream(sock: socket.socket, total: int, pat: bytes) -> None:
    """Receive ``total`` stream bytes and check each against the pattern."""
    off = 0
    while off < total:
        data = sock.recv(min(total - off, 1 << 16))
        if not data:
            raise ConnectionError(f"stream ended at {off} of {total} bytes")
        start = off % 251
        if data != pat[start:start + len(data)]:
            raise ValueError(f"stream data wrong near offset {off}")
        off += len(data)


def send_stream(sock: socket.socket, total: int, chunk: int, pat: bytes) -> None:
    off = 0
    view = memoryview(pat)
    while off < total:
        k = min(chunk, total - off)
        start = off % 251
        sock.sendall(view[start:start + k])
        off += k


def serve(sock: socket.socket, rounds: int, msg: int, total: int) -> None:
    """The host side of the three phases (the guest's peer, or the baseline's)."""
    pat = pattern(1 << 16)
    for _ in range(rounds):
        sock.sendall(recv_exact(sock, msg))
    check_stream(sock, total, pat)
    sock.sendall(b"K")
    if recv_exact(sock, 1) != b"G":
        raise ValueError("no go-ahead for the host's stream")
    send_stream(sock, total, 1 << 16, pat)
    while sock.recv(4096):              # until the other side closes
        pass


def client(sock: socket.socket, rounds: int, msg: int, total: int, chunk: int) -> dict:
    """The guest's part, played by a host process over the socket pair."""
    pat = pattern(1 << 16)
    t0 = time.perf_counter()
    for i in range(rounds):
        out = out_for(i, msg)
        sock.sendall(out)
        if recv_exact(sock, msg) != out:
            raise ValueError(f"round trip {i} came back wrong")
    t1 = time.perf_counter()
    send_stream(sock, total, chunk, pat)
    if recv_exact(sock, 1) != b"K":
        raise ValueError("no acknowledgement of the stream")
    t2 = time.perf_counter()
    sock.sendall(b"G")
    check_stream(sock, total, pat)
    t3 = time.perf_counter()
    return {"rt": t1 - t0, "g2h": t2 - t1, "h2g": t3 - t2}


_MSGS: dict[tuple[int, int], bytes] = {}


def out_for(i: int, msg: int) -> bytes:
    """Message i of the round trips (as the guest builds it), cached per i % 256."""
    key = (i & 0xFF, msg)
    if key not in _MSGS:
        _MSGS[key] = bytes((i + k) & 0xFF for k in range(msg))
    return _MSGS[key]


def peer_cmd(a: argparse.Namespace, *where: str) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--peer", *where, "--rounds",
            str(a.rounds), "--msg", str(a.msg), "--mib", str(a.mib)]


def rates(a: argparse.Namespace, rt: float, g2h: float, h2g: float) -> dict:
    total = a.mib << 20
    return {"messages_per_s": round(a.rounds / rt) if a.rounds else None,
            "round_trip_us": round(rt / max(a.rounds, 1) * 1e6, 2),
            "g2h_mb_per_s": round(total / g2h / 1e6, 2),
            "h2g_mb_per_s": round(total / h2g / 1e6, 2)}


def baseline(a: argparse.Namespace) -> dict:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with Load() as load:
        peer = subprocess.Popen(peer_cmd(a, "--fd", str(right.fileno())),
                                pass_fds=(right.fileno(),))
        right.close()
        try:
            if recv_exact(left, 1) != b"R":   # the peer has started (not timed)
                raise RuntimeError("the baseline's peer did not start")
            times = client(left, a.rounds, a.msg, a.mib << 20, a.chunk)
        finally:
            left.close()
        if peer.wait(60) != 0:
            raise RuntimeError("the baseline's peer failed")
    return {**rates(a, times["rt"], times["g2h"], times["h2g"]), "load": load.record()}


def guest(a: argparse.Namespace, transport: str, hz: float, tmp: str) -> dict:
    uds = os.path.join(tmp, f"v-{transport}.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{uds}_{PORT}")
    listener.listen(1)
    peer = subprocess.Popen(peer_cmd(a, "--listen-fd", str(listener.fileno())),
                            pass_fds=(listener.fileno(),), stdout=subprocess.PIPE)
    listener.close()
    if peer.stdout.readline() != b"ready\n":     # started, before the guest's clock runs
        raise RuntimeError("the guest's peer did not start")
    vm = MicroVM("virtio_vsock", memory="64M",
                 args=f"mmio={int(transport == 'mmio')} port={PORT} bench=1 "
                      f"rounds={a.rounds} msg={a.msg} bytes={a.mib << 20} chunk={a.chunk}")
    marks: dict[str, object] = {}

    def start(call):
        marks["start"] = vm.kvm_exits()
        return 0

    def result(call):
        marks["end"] = vm.kvm_exits()
        marks["result"] = call.args
        return 0

    vm.hypercalls.register(HC_START, start, "vsock-bench-start")
    vm.hypercalls.register(HC_RESULT, result, "vsock-bench-result")
    try:
        vm.add_virtio_vsock(3, uds, transport=transport)
        with Load() as load:
            code = vm.run(timeout=600)
        if code != 0:
            raise RuntimeError(f"virtio-vsock guest failed ({code}): "
                               f"{vm.console_output.decode()[-500:]}")
    finally:
        vm.close()
        os.unlink(f"{uds}_{PORT}")
        try:
            rc = peer.wait(60)
        except subprocess.TimeoutExpired:
            peer.kill()
            rc = -1
        peer.stdout.close()
    if rc != 0:
        raise RuntimeError(f"the guest's peer failed ({rc})")
    _rounds_msg, total, c_rt, c_g2h, c_h2g, notifies = marks["result"][:6]
    if total != a.mib << 20:
        raise RuntimeError(f"the guest reports {total} bytes")
    out = rates(a, c_rt / hz, c_g2h / hz, c_h2g / hz)
    packets = 2 * a.rounds + 2 * -(-total // a.chunk)
    out.update(kvm_exits=marks["end"] - marks["start"] - 1,
               notifications_per_packet=round(notifies / packets, 4), load=load.record())
    return out


def run_peer(a: argparse.Namespace) -> int:
    """--peer: the host side, on an inherited socket (or listener)."""
    if a.listen_fd is not None:
        listener = socket.socket(fileno=a.listen_fd)
        listener.settimeout(120)
        print("ready", flush=True)
        sock, _ = listener.accept()
        listener.close()
    else:
        sock = socket.socket(fileno=a.fd)
        sock.sendall(b"R")              # ready: the baseline's clock starts after this
    sock.settimeout(300)
    sock.setblocking(True)
    with sock:
        serve(sock, a.rounds, a.msg, a.mib << 20)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2000, help="round trips")
    ap.add_argument("--msg", type=int, default=64, help="round-trip message bytes (1..4096)")
    ap.add_argument("--mib", type=int, default=16, help="MiB streamed each way")
    ap.add_argument("--chunk", type=int, default=4096, help="bytes per send (1..4096)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--transports", nargs="+", default=["pci", "mmio"], choices=["pci", "mmio"])
    ap.add_argument("-o", "--output", help="write the JSON here as well")
    ap.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rounds < 1 or not 1 <= a.msg <= 4096 or not 1 <= a.chunk <= 4096 \
            or not 1 <= a.mib <= 1024 or a.repeat < 1:
        ap.error("--rounds, --repeat >= 1; --msg and --chunk 1..4096; --mib 1..1024")
    if a.peer:
        return run_peer(a)
    hz = tsc_hz()
    tmp = tempfile.mkdtemp(prefix="hvkit-vsock-")
    started = time.time()
    runs: dict[str, list[dict]] = {"unix_socketpair": []}
    runs.update({f"virtio-{t}": [] for t in a.transports})
    try:
        for i in range(a.repeat):
            print(f"vsock: run {i + 1}/{a.repeat} (load {os.getloadavg()[0]:.2f}) ...",
                  file=sys.stderr)
            runs["unix_socketpair"].append(baseline(a))
            for t in a.transports:
                runs[f"virtio-{t}"].append(guest(a, t, hz, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results: dict[str, object] = {}
    for kind, rs in runs.items():
        results[kind] = {f"{m}_median": statistics.median(r[m] for r in rs) for m in METRICS}
        results[kind]["runs"] = rs
    base = results["unix_socketpair"]
    results["ratio_to_unix_socketpair"] = {
        kind: {m: round(results[kind][f"{m}_median"] / base[f"{m}_median"], 3)
               for m in METRICS}
        for kind in runs if kind != "unix_socketpair"}
    report = {"benchmark": "virtio-vsock guest<->host",
              "baseline": "two host processes over socketpair(AF_UNIX, SOCK_STREAM), "
                          "the same phases and sizes",
              "rounds": a.rounds, "msg_bytes": a.msg, "stream_bytes": a.mib << 20,
              "chunk_bytes": a.chunk, "tsc_hz": hz,
              "seconds": round(time.time() - started, 1), "results": results}
    emit(report, a.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
