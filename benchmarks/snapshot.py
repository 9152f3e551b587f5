#!/usr/bin/env python3
"""Snapshots: how fast a VM comes back, against booting it, in one run.

The guest is `echo` (hvkit's bundled guest that waits for console input).
Baseline: a cold start, from MicroVM("echo") to "echo ready" on its
console. hvkit: the same VM saved once at that point, then restored
(`cow`, `eager`, `lazy`) until it echoes a byte typed after the restore:
the time from MicroVM.restore() to the guest's answer, which covers the
restore, vCPU start and the guest touching its memory again. Also the
snapshot's own cost (state and memory file) and clones per second
(restore, answer, close, back to back).

Snapshot cost per RAM size (default 256 MiB and 1 GiB): a full snapshot and
a diff snapshot after the `counter` guest dirtied 1% of RAM, time and
bytes on disk. Restore-to-running (MicroVM.restore() + start() returned)
and restore-to-answer per memory mode.

Prints one JSON object with medians, the ratio cold/restore per mode, the
host's load average and the hvkit version. Needs /dev/kvm; runs against the
installed hvkit.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import hvkit
from hvkit import MicroVM
from hvkit.vmm.reaper import wait_for_closes


def wait_for(vm: MicroVM, text: bytes, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while text not in vm.console_output:
        if time.monotonic() > end or vm.finished.is_set():
            raise RuntimeError(f"guest never printed {text!r}: {vm.console_output[-200:]!r}")
        time.sleep(0.0002)


def cold(memory: str) -> float:
    t = time.perf_counter()
    vm = MicroVM("echo", memory=memory)
    vm.start()
    wait_for(vm, b"echo ready")
    dt = time.perf_counter() - t
    vm.close(wait=False)
    return dt


def restored(path: str, mode: str) -> tuple[float, float, float]:
    t = time.perf_counter()
    vm = MicroVM.restore(path, memory=mode)
    built = time.perf_counter() - t
    vm.start()
    running = time.perf_counter() - t
    vm.send_input(b"z")
    wait_for(vm, b"z")
    dt = time.perf_counter() - t
    vm.close(wait=False)
    return built, running, dt


def parse_mib(text: str) -> int:
    from hvkit.sizes import parse_size
    return parse_size(text) >> 20


def snapshot_costs(size: str, where: str) -> dict:
    """Full snapshot, then a diff after the counter guest wrote 1% of RAM."""
    pages = max(1, (parse_mib(size) << 20) // 4096 // 100)
    vm = MicroVM("counter", memory=size, args=f"pages={pages} every={pages * 50}")
    try:
        vm.start()
        wait_for(vm, b"n=")
        vm.pause()
        t = time.perf_counter()
        vm.snapshot(os.path.join(where, "full"), track_dirty=True)
        full_s = time.perf_counter() - t
        vm.resume()
        seen = len(vm.console_output)
        end = time.monotonic() + 30
        while vm.console_output.count(b"n=", seen) < 2 and time.monotonic() < end:
            time.sleep(0.001)
        vm.pause()
        t = time.perf_counter()
        vm.snapshot(os.path.join(where, "diff"), diff=True)
        diff_s = time.perf_counter() - t
    finally:
        vm.close()
    with open(os.path.join(where, "diff", "vm.json")) as f:
        diff_pages = sum(c for runs in json.load(f)["pages"] for _, c in runs)
    out = {"dirtied_pages": pages, "full_ms": round(full_s * 1e3, 2),
           "diff_ms": round(diff_s * 1e3, 2), "diff_pages": diff_pages}
    for kind in ("full", "diff"):
        st = os.stat(os.path.join(where, kind, "memory"))
        out[f"{kind}_bytes_on_disk"] = st.st_blocks * 512
    shutil.rmtree(os.path.join(where, "full"))
    shutil.rmtree(os.path.join(where, "diff"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--memory", default="256M",
                    help="RAM of the restored guest (restore and clone numbers)")
    ap.add_argument("--snapshot-sizes", default="256M,1G",
                    help="RAM sizes for the snapshot-cost numbers, comma-separated")
    ap.add_argument("--seconds", type=float, default=3.0, help="clone-throughput window")
    ap.add_argument("--quick", action="store_true", help="few runs (a smoke test)")
    args = ap.parse_args()
    runs = 3 if args.quick else args.runs
    load_before = os.getloadavg()
    tmp = tempfile.mkdtemp(prefix="hvkit-snapbench-")
    try:
        path = os.path.join(tmp, "echo")
        with MicroVM("echo", memory=args.memory) as vm:
            vm.start()
            wait_for(vm, b"echo ready")
            vm.pause()
            t = time.perf_counter()
            parts = vm.snapshot(path)
            save_s = time.perf_counter() - t
        st = os.stat(os.path.join(path, "memory"))
        out: dict = {"benchmark": "snapshot", "hvkit": hvkit.__version__, "guest": "echo",
                     "memory": args.memory, "runs": runs,
                     "snapshot_ms": round(save_s * 1e3, 2),
                     "snapshot_parts_ms": {k: round(v * 1e3, 2) for k, v in parts.items()},
                     "memory_file_bytes": st.st_size,
                     "memory_file_allocated": st.st_blocks * 512}
        out["snapshot_cost"] = {size: snapshot_costs(size, tmp)
                                for size in args.snapshot_sizes.split(",") if size}
        cold_s, res = [], {m: ([], [], []) for m in ("cow", "eager", "lazy")}
        for _ in range(runs):                      # interleaved, so load hits all alike
            cold_s.append(cold(args.memory))
            for mode, (built, running, total) in res.items():
                b, r, d = restored(path, mode)
                built.append(b)
                running.append(r)
                total.append(d)
        wait_for_closes()
        out["cold_boot_ms"] = round(statistics.median(cold_s) * 1e3, 3)
        for mode, (built, running, total) in res.items():
            med = statistics.median(total)
            out[f"restore_{mode}"] = {
                "restore_ms": round(statistics.median(built) * 1e3, 3),
                "to_running_ms": round(statistics.median(running) * 1e3, 3),
                "to_answer_ms": round(med * 1e3, 3),
                "min_max_ms": [round(min(total) * 1e3, 3), round(max(total) * 1e3, 3)],
                "ratio_cold_over_restore": round(statistics.median(cold_s) / med, 2)}
        n, end = 0, time.monotonic() + (0.5 if args.quick else args.seconds)
        t = time.monotonic()
        while time.monotonic() < end:
            restored(path, "cow")
            n += 1
        wait_for_closes()
        out["clones_per_s"] = round(n / (time.monotonic() - t), 1)
        # vm.clone(n): make n paused copies at once (snapshot included)
        with MicroVM.restore(path) as vm:
            vm.start()
            vm.pause()
            count = 5 if args.quick else 50
            t = time.perf_counter()
            clones = vm.clone(count)
            made = time.perf_counter() - t
            for c in clones:
                c.close(wait=False)
        wait_for_closes()
        out["clone_n"] = {"n": count, "seconds": round(made, 3),
                          "clones_per_s": round(count / made, 1)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["loadavg_before_after"] = [list(load_before), list(os.getloadavg())]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
