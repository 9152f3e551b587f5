"""NVMe: 4 KiB random I/O from the guest driver in three doorbell modes,
against fio on the host reading and writing the same backing file (the
ceiling), all in one run so that the ratios compare like with like.

    python benchmarks/nvme.py [--ios 4096] [--qd 1 32] [--repeat 3] [--hog]

Modes: (a) "mmio": every doorbell an MMIO exit served by the VMM in Python;
(b) "ioeventfd": doorbells signal the accelerator process inside KVM;
(c) "shadow": shadow doorbells + EventIdx with a polling accelerator;
(d) the host: fio (io_uring) on the same file, the same 4 KiB pages, queue
depth and I/O mode (O_DIRECT when the backend uses it, as it does by
default; --buffered for both). fio is required: without it the benchmark
says so and exits 2 rather than compare against a different baseline.

The guest (guests/nvme.c, bench=1) writes N/2 random pages then reads them
back, checking every read, and reports its TSC timings, per-I/O latencies
and how often it rang MMIO doorbells by hypercall. fio runs a random-write
job then a random-read job over the same 64 MiB, and its IOPS combine the
two as the guest's do (equal counts: the harmonic mean).

Every scenario runs --repeat times (at least 3); the JSON gives each run,
the median and the spread (min..max) of IOPS, and the ratios of the
medians. It records the machine's load (load averages before and after,
and the busy fraction of all CPUs from /proc/stat during each run), the
accelerator's engine (C or Python) with its poll-window statistics, the
hvkit install used and, when run from a git checkout, its revision. With
--hog a CPU-bound process runs on the last CPU for the whole run (the fio
baseline too). Run it against an installed hvkit (``pip install .``); the
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

from benchlib import cpu_times, fill, pct, tsc_hz

HC_RESULT, HC_START, HC_STATS = 0x1200, 0x1201, 0x1202
MODES = {"a_mmio": "mmio", "b_ioeventfd": "ioeventfd", "c_shadow": "shadow"}
PAGES = 16384                      # the LBA range used, in 4 KiB pages (64 MiB)


# -- the machine ------------------------------------------------------------------


class Load:
    """The busy fraction of all CPUs between start() and stop()."""

    def __enter__(self) -> "Load":
        self.t0 = cpu_times()
        self.loadavg0 = os.getloadavg()
        return self

    def __exit__(self, *exc: object) -> None:
        b1, t1 = cpu_times()
        b0, t0 = self.t0
        self.busy = round((b1 - b0) / max(t1 - t0, 1), 3)
        self.loadavg1 = os.getloadavg()

    def record(self) -> dict:
        return {"cpu_busy": self.busy, "loadavg_1m": [round(self.loadavg0[0], 2),
                                                      round(self.loadavg1[0], 2)]}


def git_revision() -> dict | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"revision": rev, "modified_files": len(dirty.splitlines())}


class Hog:
    """A CPU-bound process pinned to the last CPU."""

    def __init__(self) -> None:
        self.cpu = max(os.sched_getaffinity(0))
        self.proc = subprocess.Popen(
            [sys.executable, "-c",
             f"import os\nos.sched_setaffinity(0, {{{self.cpu}}})\nwhile True: pass"])

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


# -- the guest ----------------------------------------------------------------------

def accelerator_stats(ctrl) -> dict | None:
    acc = getattr(ctrl, "accelerator", None)
    if acc is None:
        return None
    try:
        return acc.stats()
    except Exception as exc:              # report, do not lose the run
        return {"error": str(exc)}


def run_stats_delta(a: dict | None, b: dict | None) -> dict | None:
    if not a or not b or "run" not in b:
        return None
    ra, rb = a.get("run") or {}, b["run"]
    levels = ("max_pass", "window_ns", "window_min_ns", "window_max_ns")    # not counters
    out = {k: rb[k] - ra.get(k, 0) for k in rb if k not in levels}
    out.update({k: rb[k] for k in rb if k in levels})
    cmds = out.get("commands", 0)
    if out.get("work_passes"):
        out["commands_per_pass"] = round(cmds / out["work_passes"], 2)
    return out


def run_guest(mode: str, qd: int, ios: int, disk: str, hz: float, direct: bool) -> dict:
    backend = RawFileBackend(disk, direct=direct)
    shadow = 0 if mode == "mmio" else 1
    vm = MicroVM("nvme", memory="256M",
                 args=f"bench=1 ios={ios} qd={qd} shadow={shadow} lbas={PAGES}")
    marks: dict[str, object] = {}
    ctrl = None

    def counters() -> tuple[int, int]:
        c = vm.exit_counts()
        user = c.get("MMIO", 0) + c.get("IO", 0) - c.get("native", 0)
        return user, vm.kvm_exits()

    def start(call):
        marks["acc0"] = accelerator_stats(ctrl)
        marks["start"] = counters()
        return 0

    def stats(call):
        marks["guest"] = tuple(call.args)
        return 0

    def result(call):
        marks["end"] = counters()
        marks["acc1"] = accelerator_stats(ctrl)
        n, q, cycles, wcycles, lat_addr, nlat = call.args
        lat = struct.unpack(f"<{nlat}Q", vm.memory.read(lat_addr, 8 * nlat))
        marks["result"] = (n, cycles, wcycles, lat)
        return 0

    vm.hypercalls.register(HC_START, start, "nvme-bench-start")
    vm.hypercalls.register(HC_STATS, stats, "nvme-bench-stats")
    vm.hypercalls.register(HC_RESULT, result, "nvme-bench-result")
    try:
        ctrl = vm.add_nvme([backend], mode=mode)
        with Load() as load:
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
    out = {
        "iops": round(n / secs),
        "write_iops": round((n // 2) / (wcycles / hz)),
        "read_iops": round((n - n // 2) / ((cycles - wcycles) / hz)),
        "lat_us_p50": round(pct(lat_us, 50), 2),
        "lat_us_p99": round(pct(lat_us, 99), 2),
        # the two hypercalls at the end are port exits themselves
        "vmm_exits_per_io": round(max(u1 - u0 - 2, 0) / n, 3),
        "kvm_exits_per_io": round(max(k1 - k0 - 2, 0) / n, 3),
        "load": load.record(),
    }
    if "guest" in marks:
        sq, cq, submits, reaps, wait, ring = marks["guest"]
        out["guest"] = {"sq_doorbells_per_io": round(sq / n, 3),
                        "cq_doorbells_per_io": round(cq / n, 3),
                        "ios_per_submit": round(n / max(submits, 1), 2),
                        "ios_per_reap": round(n / max(reaps, 1), 2),
                        "wait_share": round(wait / cycles, 3),
                        "doorbell_us_each": round(ring / hz * 1e6 / max(sq + cq, 1), 2)}
    acc1 = marks.get("acc1")
    if acc1:
        out["engine"] = acc1.get("engine")
        out["uring"] = acc1.get("uring")
        out["poll_us"] = acc1.get("poll_us")
        run = run_stats_delta(marks.get("acc0"), acc1)
        if run is not None:
            out["run"] = run
    else:
        out["engine"] = "vmm (python, vcpu thread)"
    return out


# -- the host -----------------------------------------------------------------------

def fio_job(path: str, rw: str, qd: int, seconds: float, direct: bool) -> dict:
    out = subprocess.run(
        ["fio", "--name=ceiling", f"--filename={path}", f"--rw={rw}", "--bs=4k",
         f"--iodepth={qd}", "--ioengine=io_uring", f"--direct={int(direct)}",
         f"--size={PAGES * 4096}", f"--runtime={seconds}", "--time_based",
         "--output-format=json", "--randrepeat=1", "--norandommap", "--lat_percentiles=1"],
        capture_output=True, text=True, check=True).stdout
    job = json.loads(out)["jobs"][0]
    side = job["write" if "write" in rw else "read"]
    lat = side.get("lat_ns", {}).get("percentile") or side["clat_ns"].get("percentile", {})
    return {"iops": side["iops"], "p50": lat.get("50.000000", 0) / 1e3,
            "p99": lat.get("99.000000", 0) / 1e3}


def host_fio(path: str, qd: int, seconds: float, direct: bool) -> dict:
    with Load() as load:
        w = fio_job(path, "randwrite", qd, seconds, direct)
        r = fio_job(path, "randread", qd, seconds, direct)
    # equal numbers of writes and reads, as the guest does them
    iops = 2 / (1 / w["iops"] + 1 / r["iops"])
    return {"iops": round(iops), "write_iops": round(w["iops"]), "read_iops": round(r["iops"]),
            "lat_us_p50": round((w["p50"] + r["p50"]) / 2, 2),
            "lat_us_p99": round(max(w["p99"], r["p99"]), 2),
            "tool": f"fio io_uring, {'O_DIRECT' if direct else 'buffered'}",
            "load": load.record()}


# -- the run ----------------------------------------------------------------------

def summarise(runs: list[dict]) -> dict:
    iops = [r["iops"] for r in runs]
    out = {"iops_median": round(statistics.median(iops)), "iops_min": min(iops),
           "iops_max": max(iops),
           "spread": round((max(iops) - min(iops)) / max(statistics.median(iops), 1), 3),
           "lat_us_p50_median": round(statistics.median(r["lat_us_p50"] for r in runs), 2),
           "cpu_busy_median": statistics.median(r["load"]["cpu_busy"] for r in runs)}
    if "kvm_exits_per_io" in runs[0]:
        out["kvm_exits_per_io_median"] = statistics.median(r["kvm_exits_per_io"] for r in runs)
        out["vmm_exits_per_io_median"] = statistics.median(r["vmm_exits_per_io"] for r in runs)
    if "engine" in runs[0]:
        out["engine"] = runs[0]["engine"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ios", type=int, default=4096)
    ap.add_argument("--qd", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeat", type=int, default=3, help="runs per scenario (at least 3)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--disk-mb", type=int, default=256)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--fio-seconds", type=float, default=2.0)
    ap.add_argument("--hog", action="store_true",
                    help="run everything with a CPU-bound process on the last CPU")
    ap.add_argument("--buffered", action="store_true",
                    help="open the disk without O_DIRECT (the host baseline follows)")
    a = ap.parse_args()
    if a.repeat < 3:
        ap.error("--repeat must be at least 3: a median of fewer runs says little here")
    if shutil.which("fio") is None:
        print("nvme benchmark: fio is not installed (apt-get install fio, or "
              "scripts/install-deps.sh --test); the host baseline needs it, and ratios "
              "against another tool would mean something else. Nothing measured.",
              file=sys.stderr)
        return 2
    hz = tsc_hz()
    tmp = tempfile.mkdtemp(prefix="hvkit-nvme-", dir=a.dir)
    disk = os.path.join(tmp, "disk.img")
    probe = RawFileBackend.create(disk, a.disk_mb << 20, direct=not a.buffered)
    direct = probe.direct        # O_DIRECT where the file system allows it
    probe.close()
    fill(disk, min(a.disk_mb << 20, PAGES * 4096))
    hog = Hog() if a.hog else None
    results: dict[str, dict] = {}
    started = time.time()
    try:
        if hog:
            time.sleep(0.5)
        for qd in a.qd:
            row: dict[str, dict] = {}
            for key in [*a.modes, "d_host"]:
                runs = []
                for i in range(a.repeat):
                    print(f"nvme: {key} qd {qd} run {i + 1}/{a.repeat} "
                          f"(load {os.getloadavg()[0]:.2f}) ...", file=sys.stderr)
                    if key == "d_host":
                        runs.append(host_fio(disk, qd, a.fio_seconds, direct))
                    else:
                        runs.append(run_guest(MODES[key], qd, a.ios, disk, hz, direct))
                row[key] = {"summary": summarise(runs), "runs": runs}
            med = {k: v["summary"]["iops_median"] for k, v in row.items()}
            ratios = {}
            for k in a.modes:
                if k != "a_mmio" and "a_mmio" in med:
                    ratios[f"{k}_over_a_mmio"] = round(med[k] / med["a_mmio"], 3)
                ratios[f"{k}_over_d_host"] = round(med[k] / med["d_host"], 3)
            if "c_shadow" in row:
                ratios["c_shadow_p50_over_d_host_p50"] = round(
                    row["c_shadow"]["summary"]["lat_us_p50_median"]
                    / max(row["d_host"]["summary"]["lat_us_p50_median"], 0.01), 2)
            row["ratios_of_medians"] = ratios
            results[f"qd{qd}"] = row
    finally:
        if hog:
            hog.close()
        shutil.rmtree(tmp, ignore_errors=True)
    top = results.get(f"qd{max(a.qd)}", {}).get("ratios_of_medians", {})
    bottom = results.get(f"qd{min(a.qd)}", {}).get("ratios_of_medians", {})
    c_top = results.get(f"qd{max(a.qd)}", {}).get("c_shadow", {}).get("summary", {})
    if a.hog:
        targets = {
            "c_at_least_a": top.get("c_shadow_over_a_mmio", 0) >= 1,
            "b_at_least_a": top.get("b_ioeventfd_over_a_mmio", 0) >= 1,
            "c_at_least_half_of_d": top.get("c_shadow_over_d_host", 0) >= 0.5,
            "b_at_least_half_of_d": top.get("b_ioeventfd_over_d_host", 0) >= 0.5,
        }
    else:
        targets = {
            "c_at_least_4x_a": top.get("c_shadow_over_a_mmio", 0) >= 4,
            "c_at_least_0.8x_d": top.get("c_shadow_over_d_host", 0) >= 0.8,
            "c_under_0.1_kvm_exits_per_io": c_top.get("kvm_exits_per_io_median", 1) < 0.1,
            "c_qd1_p50_within_1.5x_d": 0 < bottom.get("c_shadow_p50_over_d_host_p50", 99) <= 1.5,
        }
    print(json.dumps({
        "scenario": "hog" if a.hog else "quiet",
        "note": ("ratios compare medians measured in this run, under the same load; "
                 "the load is recorded with every run"),
        "results": results, "targets": targets,
        "machine": {"cpus": os.cpu_count(), "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
                    "hog_cpu": hog.cpu if hog else None, "seconds": round(time.time() - started)},
        "hvkit": {"path": os.path.dirname(os.path.abspath(hvkit.__file__)),
                  "git": git_revision()},
        "ios_per_run": a.ios, "repeat": a.repeat, "tsc_hz": hz,
        "backend_io": "O_DIRECT" if direct else "buffered",
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
