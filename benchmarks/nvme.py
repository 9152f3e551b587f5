"""NVMe: 4 KiB random I/O from the guest driver in three doorbell modes,
against the host reading the same backing file directly (the ceiling).

    python benchmarks/nvme.py [--ios 4096] [--qd 1 32] [--disk-mb 256] [--dir /var/tmp]

Modes: (a) "mmio": every doorbell an MMIO exit served by the VMM in Python;
(b) "ioeventfd": doorbells signal the accelerator process inside KVM;
(c) "shadow": shadow doorbells + EventIdx with a polling accelerator.
(d) the host: fio (io_uring) on the backing file with the same block size,
pattern, queue depth and I/O mode (O_DIRECT when the backend uses it, as it
does by default; --buffered for both); a Python loop if fio is absent.

The guest (guests/nvme.c, bench=1) writes N/2 random pages then reads them
back, checking every read, and reports its TSC timings and per-I/O
latencies by hypercall. Exits per I/O count the exits that reached the VMM
during the timed phase (MMIO and port I/O) and the kernel's own count.
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

from hvkit.machine import MicroVM
from hvkit.storage.raw import RawFileBackend

HC_RESULT, HC_START = 0x1200, 0x1201
MODES = {"a_mmio": "mmio", "b_ioeventfd": "ioeventfd", "c_shadow": "shadow"}


def tsc_hz() -> float:
    from hvkit.kvm import Kvm
    with Kvm() as kvm:
        vm = kvm.create_vm()
        try:
            return vm.create_vcpu(0).get_tsc_khz() * 1000.0
        finally:
            vm.close()


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def run_guest(mode: str, qd: int, ios: int, disk: str, hz: float, direct: bool) -> dict:
    backend = RawFileBackend(disk, direct=direct)
    shadow = 0 if mode == "mmio" else 1
    vm = MicroVM("nvme", memory="256M", args=f"bench=1 ios={ios} qd={qd} shadow={shadow} lbas=16384")
    marks: dict[str, object] = {}

    def counters() -> tuple[int, int]:
        c = vm.exit_counts()
        user = c.get("MMIO", 0) + c.get("IO", 0) - c.get("native", 0)
        return user, vm.kvm_exits()

    def start(call):
        marks["start"] = counters()
        return 0

    def result(call):
        marks["end"] = counters()
        n, q, cycles, wcycles, lat_addr, nlat = call.args
        lat = struct.unpack(f"<{nlat}Q", vm.memory.read(lat_addr, 8 * nlat))
        marks["result"] = (n, cycles, wcycles, lat)
        return 0

    vm.hypercalls.register(HC_START, start, "nvme-bench-start")
    vm.hypercalls.register(HC_RESULT, result, "nvme-bench-result")
    try:
        vm.add_nvme([backend], mode=mode)
        code = vm.run(timeout=600)
        if code != 0:
            raise RuntimeError(f"guest failed in mode {mode}: {vm.console_output.decode()[-400:]}")
    finally:
        vm.close()
        backend.close()
    n, cycles, wcycles, lat = marks["result"]
    (u0, k0), (u1, k1) = marks["start"], marks["end"]
    secs = cycles / hz
    lat_us = [c / hz * 1e6 for c in lat]
    return {
        "iops": round(n / secs),
        "write_iops": round((n // 2) / (wcycles / hz)),
        "read_iops": round((n - n // 2) / ((cycles - wcycles) / hz)),
        "lat_us_p50": round(pct(lat_us, 50), 2),
        "lat_us_p99": round(pct(lat_us, 99), 2),
        # the end hypercall is itself one port exit
        "vmm_exits_per_io": round(max(u1 - u0 - 1, 0) / n, 3),
        "kvm_exits_per_io": round(max(k1 - k0 - 1, 0) / n, 3),
    }


def host_fio(path: str, qd: int, seconds: float, direct: bool) -> dict | None:
    if shutil.which("fio") is None:
        return None
    out = subprocess.run(
        ["fio", "--name=ceiling", f"--filename={path}", "--rw=randrw", "--rwmixread=50",
         "--bs=4k", f"--iodepth={qd}", "--ioengine=io_uring", f"--direct={int(direct)}",
         "--size=64M", f"--runtime={seconds}", "--time_based", "--output-format=json",
         "--randrepeat=1", "--norandommap"],
        capture_output=True, text=True, check=True).stdout
    job = json.loads(out)["jobs"][0]
    iops = job["read"]["iops"] + job["write"]["iops"]
    clat = job["read"]["clat_ns"]["percentile"]
    return {"iops": round(iops), "lat_us_p50": round(clat.get("50.000000", 0) / 1e3, 2),
            "lat_us_p99": round(clat.get("99.000000", 0) / 1e3, 2),
            "tool": f"fio io_uring, {'O_DIRECT' if direct else 'buffered'}"}


def host_pread(path: str, ios: int) -> dict:
    fd = os.open(path, os.O_RDWR)
    rng = random.Random(1)
    pages = [rng.randrange(16384) for _ in range(ios)]
    buf = b"x" * 4096
    lat = []
    t0 = time.perf_counter()
    for i, p in enumerate(pages):
        t = time.perf_counter()
        if i % 2:
            os.pread(fd, 4096, p * 4096)
        else:
            os.pwrite(fd, buf, p * 4096)
        lat.append((time.perf_counter() - t) * 1e6)
    secs = time.perf_counter() - t0
    os.close(fd)
    return {"iops": round(ios / secs), "lat_us_p50": round(pct(lat, 50), 2),
            "lat_us_p99": round(pct(lat, 99), 2), "tool": "python pread/pwrite, qd 1"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ios", type=int, default=4096)
    ap.add_argument("--qd", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--disk-mb", type=int, default=256)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--fio-seconds", type=float, default=3.0)
    ap.add_argument("--buffered", action="store_true",
                    help="open the disk without O_DIRECT (the host baseline follows)")
    a = ap.parse_args()
    hz = tsc_hz()
    tmp = tempfile.mkdtemp(prefix="hvkit-nvme-", dir=a.dir)
    disk = os.path.join(tmp, "disk.img")
    probe = RawFileBackend.create(disk, a.disk_mb << 20, direct=not a.buffered)
    direct = probe.direct        # O_DIRECT where the file system allows it
    probe.close()
    results: dict[str, dict] = {}
    try:
        for qd in a.qd:
            row: dict[str, dict] = {}
            for key, mode in MODES.items():
                print(f"nvme: {key} qd {qd} ...", file=sys.stderr)
                row[key] = run_guest(mode, qd, a.ios, disk, hz, direct)
            print(f"nvme: d_host qd {qd} ...", file=sys.stderr)
            row["d_host"] = host_fio(disk, qd, a.fio_seconds, direct) or host_pread(disk, a.ios)
            a_iops, c_iops = row["a_mmio"]["iops"], row["c_shadow"]["iops"]
            row["ratio_c_over_a"] = round(c_iops / a_iops, 2)
            row["ratio_c_over_d"] = round(c_iops / row["d_host"]["iops"], 3)
            results[f"qd{qd}"] = row
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    top = results.get(f"qd{max(a.qd)}", {})
    summary = {
        "targets": {
            "c_at_least_4x_a_iops": top.get("ratio_c_over_a", 0) >= 4,
            "c_under_0.1_exits_per_io_at_top_qd": top.get("c_shadow", {}).get("vmm_exits_per_io", 1) < 0.1,
            "c_at_least_half_of_d": top.get("ratio_c_over_d", 0) >= 0.5,
        },
        "ios_per_run": a.ios, "tsc_hz": hz, "backend_io": "O_DIRECT" if direct else "buffered",
    }
    print(json.dumps({"results": results, **summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
