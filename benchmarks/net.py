"""virtio-net: packets/s and MB/s from the guest to the host through a tap,
against a host process writing the same frames to the same tap, in one run.

    python benchmarks/net.py [--frames 20000] [--size 60 1514] [--repeat 3]
                             [--transports pci mmio] [-o out.json]

The guest (guests/virtio_net.c, bench=1) streams --frames frames of --size
bytes (Ethernet header included, no vnet offloads) as fast as its transmit
ring takes them and waits until the device has returned every buffer; its
TSC times that. hvkit's virtio-net writes each frame to the tap, where the
kernel counts it as received on the interface. The baseline is a small C
program (compiled here with gcc) that writes the same frames to the same
tap's descriptor with one write(2) each: the most a VMM's transmit path
can get out of that tap. Both are checked against the interface's own
rx_packets/rx_bytes counters, so a frame counts only if it reached the host.

Each scenario runs --repeat times, interleaved; the JSON has every run, the
medians, the ratios of the guest's medians to the host writer's, and the
load (load average before and after each run, the CPUs' busy share). The
host is shared: compare ratios, not absolutes. Needs root (a tap), /dev/kvm
and gcc; without gcc or taps it says so and exits 2.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from hvkit.machine import MicroVM
from hvkit.net.tap import Tap, tun_available

from benchlib import Load, emit, tsc_hz

HC_RESULT, HC_START = 0x1410, 0x1411

WRITER_C = r"""
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* writer FD FRAMES SIZE: FRAMES frames of SIZE bytes, each behind a zeroed
 * 12-byte virtio_net_hdr_v1, one write(2) each; prints the nanoseconds. */
int main(int argc, char **argv)
{
    if (argc != 4)
        return 2;
    int fd = atoi(argv[1]);
    long frames = atol(argv[2]);
    int size = atoi(argv[3]);
    static unsigned char buf[12 + 65536];
    if (size < 60 || size > 65536)
        return 2;
    memset(buf, 0, sizeof(buf));
    memset(buf + 12, 0xFF, 6);
    memcpy(buf + 18, "\x02\x00\x00\x00\x00\x01\x88\xB5", 8);
    for (int i = 26; i < 12 + size; i++)
        buf[i] = (unsigned char)(i * 7);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < frames;) {
        memcpy(buf + 26, &i, 4);
        if (write(fd, buf, 12 + (size_t)size) < 0) {
            if (errno == EAGAIN) {
                struct pollfd p = { fd, POLLOUT, 0 };
                poll(&p, 1, 1000);
                continue;
            }
            perror("write");
            return 1;
        }
        i++;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("%ld\n", (t1.tv_sec - t0.tv_sec) * 1000000000L + (t1.tv_nsec - t0.tv_nsec));
    return 0;
}
"""


def counters(tap: str) -> dict[str, int]:
    out = {}
    for name in ("rx_packets", "rx_bytes", "rx_dropped"):
        with open(f"/sys/class/net/{tap}/statistics/{name}") as f:
            out[name] = int(f.read())
    return out


def arrived(tap: str, before: dict[str, int]) -> dict[str, int]:
    now = counters(tap)
    return {k: now[k] - before[k] for k in now}


def quiet(tap: str) -> None:
    """No IPv6 on the tap, so the interface's counters hold only our frames."""
    path = f"/proc/sys/net/ipv6/conf/{tap}/disable_ipv6"
    if os.path.exists(path):
        with open(path, "w") as f:
            f.write("1")


def rates(frames: int, size: int, seconds: float) -> dict:
    return {"packets_per_s": round(frames / seconds),
            "mb_per_s": round(frames * size / seconds / 1e6, 2),
            "seconds": round(seconds, 4)}


def host_writer(exe: str, tap: Tap, frames: int, size: int) -> dict:
    before = counters(tap.name)
    with Load() as load:
        out = subprocess.run([exe, str(tap.fd), str(frames), str(size)], pass_fds=(tap.fd,),
                             capture_output=True, text=True, check=True).stdout
    got = arrived(tap.name, before)
    res = rates(frames, size, int(out) / 1e9)
    res.update(arrived=got, load=load.record())
    return res


def guest(tap: Tap, transport: str, frames: int, size: int, hz: float) -> dict:
    vm = MicroVM("virtio_net", memory="64M",
                 args=f"bench=1 tx={frames} size={size} mmio={int(transport == 'mmio')}")
    marks: dict[str, object] = {}

    def start(call):
        marks["start"] = (vm.kvm_exits(), time.perf_counter())
        return 0

    def result(call):
        marks["end"] = (vm.kvm_exits(), time.perf_counter())
        marks["result"] = call.args
        return 0

    vm.hypercalls.register(HC_START, start, "net-bench-start")
    vm.hypercalls.register(HC_RESULT, result, "net-bench-result")
    try:
        net = vm.add_virtio_net(tap, transport=transport)
        before = counters(tap.name)
        with Load() as load:
            code = vm.run(timeout=600)
        if code != 0:
            raise RuntimeError(f"virtio-net guest failed ({code}): "
                               f"{vm.console_output.decode()[-500:]}")
        got = arrived(tap.name, before)
        stats = dict(net.stats)
    finally:
        vm.close()
    n, nbytes, cycles, notifies, stale = marks["result"][:5]
    if n != frames or nbytes != frames * size:
        raise RuntimeError(f"the guest reports {n} frames, {nbytes} bytes")
    res = rates(frames, size, cycles / hz)
    exits = marks["end"][0] - marks["start"][0] - 1       # the result call is an exit
    res.update(wall_seconds=round(marks["end"][1] - marks["start"][1], 4),
               kvm_exits_per_packet=round(max(exits, 0) / frames, 4),
               notifications_per_packet=round(notifies / frames, 4),
               guest_stale_reads=stale, device=stats, arrived=got, load=load.record())
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=20000)
    ap.add_argument("--size", type=int, nargs="+", default=[60, 1514],
                    help="frame sizes in bytes, Ethernet header included (60..1514)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--transports", nargs="+", default=["pci", "mmio"], choices=["pci", "mmio"])
    ap.add_argument("-o", "--output", help="write the JSON here as well")
    a = ap.parse_args()
    if a.frames < 1 or a.repeat < 1 or any(not 60 <= s <= 1514 for s in a.size):
        ap.error("--frames and --repeat must be positive, sizes 60..1514")
    why = tun_available()
    if why:
        print(f"net benchmark: no tap can be made here ({why}). Nothing measured.",
              file=sys.stderr)
        return 2
    cc = os.environ.get("CC", "gcc")
    if shutil.which(cc) is None:
        print(f"net benchmark: {cc} is not installed; the host baseline is a C program. "
              "Nothing measured.", file=sys.stderr)
        return 2
    hz = tsc_hz()
    tmp = tempfile.mkdtemp(prefix="hvkit-net-")
    started = time.time()
    results: dict[str, dict] = {}
    try:
        src = os.path.join(tmp, "writer.c")
        exe = os.path.join(tmp, "writer")
        with open(src, "w") as f:
            f.write(WRITER_C)
        subprocess.run([cc, "-O2", "-o", exe, src], check=True)
        with Tap.create() as tap:
            quiet(tap.name)
            for size in a.size:
                runs: dict[str, list[dict]] = {"host_writer": []}
                runs.update({f"virtio-{t}": [] for t in a.transports})
                for i in range(a.repeat):
                    print(f"net: {size}-byte frames, run {i + 1}/{a.repeat} "
                          f"(load {os.getloadavg()[0]:.2f}) ...", file=sys.stderr)
                    runs["host_writer"].append(host_writer(exe, tap, a.frames, size))
                    for t in a.transports:
                        runs[f"virtio-{t}"].append(guest(tap, t, a.frames, size, hz))
                row: dict[str, object] = {}
                for kind, rs in runs.items():
                    row[kind] = {
                        "packets_per_s_median": round(statistics.median(
                            r["packets_per_s"] for r in rs)),
                        "mb_per_s_median": round(statistics.median(r["mb_per_s"] for r in rs), 2),
                        "runs": rs}
                base = row["host_writer"]["packets_per_s_median"]
                row["ratio_to_host_writer"] = {
                    k: round(v["packets_per_s_median"] / max(base, 1), 3)
                    for k, v in row.items() if k != "host_writer"}
                results[f"{size}B"] = row
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = {"benchmark": "virtio-net guest->host through a tap",
              "baseline": "a host C program writing the same frames to the same tap fd",
              "frames_per_run": a.frames, "tsc_hz": hz,
              "seconds": round(time.time() - started, 1), "results": results}
    emit(report, a.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
