"""virtio-blk: 4 KiB random read IOPS from the freestanding driver at QD1 and
QD32, over virtio-pci and virtio-mmio, against fio on the host reading the
same file (the ceiling) and hvkit's NVMe in shadow-doorbell mode, in one run.
virtio-pci and virtio-mmio use the C queue engine (the disk is a raw file);
virtio-pci-python serves the same disk with the Python engine, for the
difference; each virtio run records its engine and the C loop's statistics
(poll window, sleeps, notifications taken, waits on the ring).

    python benchmarks/virtio_blk.py [--ios 4096] [--qd 1 32] [--repeat 3]

The guest (guests/virtio_blk.c, bench=1) writes N/2 random pages, then reads
them back at the queue depth, checking every read; the read phase is what
is reported (its TSC time, per-read latencies), with the guest's queue
notifications and KVM's exits per read. The NVMe guest (guests/nvme.c)
does the same pages the same way. fio runs a 4 KiB io_uring random-read
job over the same range of the same file, O_DIRECT when the disk is
(as hvkit's raw backend opens it where the file system allows). fio is
required: without it the benchmark says so and exits 2.

Every scenario runs --repeat times (at least 3); the JSON gives each run and
the median, min and max, the ratios of the medians to fio, and the load
(os.getloadavg() before and after each run, the CPUs' busy share from
/proc/stat). Run it against an installed hvkit (``pip install .``); the
source tree is not put on sys.path.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

import hvkit
from hvkit.machine import MicroVM
from hvkit.storage.raw import RawFileBackend

from benchlib import Load, fill, git_revision, pct, tsc_hz

HC_BLK_RESULT, HC_BLK_START = 0x1400, 0x1401
HC_NVME_RESULT, HC_NVME_START = 0x1200, 0x1201
PAGES = 16384                  # the range used, in 4 KiB pages (64 MiB)


def run_guest(kind: str, qd: int, ios: int, disk: str, hz: float, direct: bool) -> dict:
    """One guest run: kind is "virtio-pci", "virtio-mmio", "virtio-pci-python"
    (the Python queue engine) or "nvme-shadow"."""
    backend = RawFileBackend(disk, direct=direct)
    nvme = kind == "nvme-shadow"
    if nvme:
        vm = MicroVM("nvme", memory="256M",
                     args=f"bench=1 ios={ios} qd={qd} shadow=1 lbas={PAGES}")
        start_nr, result_nr = HC_NVME_START, HC_NVME_RESULT
    else:
        mmio = int(kind == "virtio-mmio")
        vm = MicroVM("virtio_blk", memory="256M",
                     args=f"bench=1 ios={ios} qd={qd} mmio={mmio} lbas={PAGES}")
        start_nr, result_nr = HC_BLK_START, HC_BLK_RESULT
    marks: dict[str, object] = {}

    def start(call):
        marks["start"] = vm.kvm_exits()
        marks["kinds0"] = exit_kinds(vm)
        return 0

    def result(call):
        marks["end"] = vm.kvm_exits()
        marks["kinds1"] = exit_kinds(vm)
        a = call.args
        if nvme:
            n, _q, cycles, wcycles, lat_addr, nlat = a
            notifies = None
        else:
            n, cycles, wcycles, notifies, lat_addr, nlat = a[0] & 0xFFFFFFFF, *a[1:]
        lat = struct.unpack(f"<{nlat}Q", vm.memory.read(lat_addr, 8 * nlat))
        marks["result"] = (n, cycles, wcycles, notifies, lat)
        return 0

    vm.hypercalls.register(start_nr, start, f"{kind}-bench-start")
    vm.hypercalls.register(result_nr, result, f"{kind}-bench-result")
    engine = "python" if kind.endswith("-python") else "native"
    dev = None
    try:
        if nvme:
            vm.add_nvme([backend], mode="shadow")
        else:
            os.environ["HVKIT_VIRTIO_BLK_ENGINE"] = engine
            try:
                dev = vm.add_virtio_blk(backend, transport=kind.split("-")[1])
            finally:
                del os.environ["HVKIT_VIRTIO_BLK_ENGINE"]
        with Load() as load:
            code = vm.run(timeout=900)
        if code != 0:
            raise RuntimeError(f"{kind} guest failed: {vm.console_output.decode()[-500:]}")
        console = vm.console_output.decode()
    finally:
        vm.close()
        backend.close()
    native = dev.native if dev is not None else None
    n, cycles, wcycles, notifies, lat = marks["result"]
    reads = n - n // 2
    read_secs = (cycles - wcycles) / hz
    read_lat = [c / hz * 1e6 for c in lat[n // 2:]]
    out = {"read_iops": round(reads / read_secs),
           "write_iops": round((n // 2) / (wcycles / hz)),
           "lat_us_p50": round(pct(read_lat, 50), 2), "lat_us_p99": round(pct(read_lat, 99), 2),
           # the result hypercall is an exit itself
           "kvm_exits_per_io": round(max(marks["end"] - marks["start"] - 1, 0) / n, 3),
           # KVM's own split; the rest are exits the kernel serves itself
           # (ioeventfd notifications, hypercalls, on PVM hosts emulated
           # guest-kernel instructions)
           "kvm_exit_kinds_per_io": {k: round((marks["kinds1"][k] - marks["kinds0"].get(k, 0)) / n, 3)
                                     for k in marks["kinds1"]},
           "load": load.record()}
    if dev is not None:
        out["engine"] = "C" if native is not None else "Python"
        if native is not None:
            # the poll window's decisions and where the loop spent its time
            out["engine_loop"] = native.run_stats
            out["engine_counts"] = native.stats
    if notifies is not None:
        out["notifications_per_io"] = round(notifies / n, 3)
        stale = [line for line in console.splitlines() if "stale reads" in line]
        if stale:
            out["guest_report"] = stale[-1]
    return out


def exit_kinds(vm: MicroVM) -> dict[str, int]:
    """KVM's per-reason exit counters (irq, mmio, io, halt, ...) over the vCPUs."""
    out: dict[str, int] = {}
    for vcpu in vm.vcpus:
        for key, value in vcpu.stats().items():
            if key.endswith("_exits") and key != "exits":
                out[key] = out.get(key, 0) + int(value)
    return out


def host_fio(path: str, qd: int, seconds: float, direct: bool) -> dict:
    with Load() as load:
        out = subprocess.run(
            ["fio", "--name=ceiling", f"--filename={path}", "--rw=randread", "--bs=4k",
             f"--iodepth={qd}", "--ioengine=io_uring", f"--direct={int(direct)}",
             f"--size={PAGES * 4096}", f"--runtime={seconds}", "--time_based",
             "--output-format=json", "--randrepeat=1", "--norandommap",
             "--lat_percentiles=1"], capture_output=True, text=True, check=True).stdout
    side = json.loads(out)["jobs"][0]["read"]
    lat = side.get("lat_ns", {}).get("percentile") or side["clat_ns"].get("percentile", {})
    return {"read_iops": round(side["iops"]),
            "lat_us_p50": round(lat.get("50.000000", 0) / 1e3, 2),
            "lat_us_p99": round(lat.get("99.000000", 0) / 1e3, 2),
            "tool": f"fio io_uring randread, {'O_DIRECT' if direct else 'buffered'}",
            "load": load.record()}


def summarise(runs: list[dict]) -> dict:
    iops = [r["read_iops"] for r in runs]
    out = {"read_iops_median": round(statistics.median(iops)), "read_iops_min": min(iops),
           "read_iops_max": max(iops),
           "lat_us_p50_median": round(statistics.median(r["lat_us_p50"] for r in runs), 2)}
    for key in ("kvm_exits_per_io", "notifications_per_io"):
        if key in runs[0]:
            out[f"{key}_median"] = statistics.median(r[key] for r in runs)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ios", type=int, default=4096)
    ap.add_argument("--qd", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeat", type=int, default=3, help="runs per scenario (at least 3)")
    ap.add_argument("--scenarios", nargs="+",
                    default=["virtio-pci", "virtio-mmio", "virtio-pci-python", "nvme-shadow",
                             "host-fio"],
                    choices=["virtio-pci", "virtio-mmio", "virtio-pci-python", "nvme-shadow",
                             "host-fio"])
    ap.add_argument("--disk-mb", type=int, default=128)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--fio-seconds", type=float, default=2.0)
    ap.add_argument("--buffered", action="store_true", help="no O_DIRECT (fio follows)")
    ap.add_argument("-o", "--output", help="write the JSON here as well")
    a = ap.parse_args()
    if a.repeat < 3:
        ap.error("--repeat must be at least 3")
    if a.disk_mb * 256 < PAGES:
        ap.error(f"--disk-mb must be at least {PAGES // 256}")
    if "host-fio" in a.scenarios and shutil.which("fio") is None:
        print("virtio-blk benchmark: fio is not installed (apt-get install fio); the host "
              "baseline needs it, and another tool would measure something else. "
              "Nothing measured.", file=sys.stderr)
        return 2
    hz = tsc_hz()
    tmp = tempfile.mkdtemp(prefix="hvkit-virtio-blk-", dir=a.dir)
    disk = os.path.join(tmp, "disk.img")
    probe = RawFileBackend.create(disk, a.disk_mb << 20, direct=not a.buffered)
    direct = probe.direct
    probe.close()
    fill(disk, PAGES * 4096)
    results: dict[str, dict] = {}
    started = time.time()
    try:
        for qd in a.qd:
            row: dict[str, dict] = {}
            for kind in a.scenarios:
                runs = []
                for i in range(a.repeat):
                    print(f"virtio-blk: {kind} qd {qd} run {i + 1}/{a.repeat} "
                          f"(load {os.getloadavg()[0]:.2f}) ...", file=sys.stderr)
                    if kind == "host-fio":
                        runs.append(host_fio(disk, qd, a.fio_seconds, direct))
                    else:
                        runs.append(run_guest(kind, qd, a.ios, disk, hz, direct))
                row[kind] = {"summary": summarise(runs), "runs": runs}
            if "host-fio" in row:
                ceiling = row["host-fio"]["summary"]["read_iops_median"]
                row["ratio_to_host_fio"] = {
                    k: round(v["summary"]["read_iops_median"] / max(ceiling, 1), 3)
                    for k, v in row.items() if k != "host-fio"}
            results[f"qd{qd}"] = row
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = {"benchmark": "virtio-blk 4 KiB random read",
              "hvkit": {"version": getattr(hvkit, "__version__", None),
                        "path": os.path.dirname(hvkit.__file__), "git": git_revision()},
              "ios_per_run": a.ios, "pages": PAGES, "direct": direct, "tsc_hz": hz,
              "cpus": os.cpu_count(), "loadavg_end": [round(x, 2) for x in os.getloadavg()],
              "seconds": round(time.time() - started, 1), "results": results}
    text = json.dumps(report, indent=2)
    print(text)
    if a.output:
        with open(a.output, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
