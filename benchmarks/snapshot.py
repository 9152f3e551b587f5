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


def restored(path: str, mode: str) -> tuple[float, float]:
    t = time.perf_counter()
    vm = MicroVM.restore(path, memory=mode)
    built = time.perf_counter() - t
    vm.start()
    vm.send_input(b"z")
    wait_for(vm, b"z")
    dt = time.perf_counter() - t
    vm.close(wait=False)
    return built, dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--memory", default="256M")
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
        cold_s, res = [], {m: ([], []) for m in ("cow", "eager", "lazy")}
        for _ in range(runs):                      # interleaved, so load hits all alike
            cold_s.append(cold(args.memory))
            for mode, (built, total) in res.items():
                b, d = restored(path, mode)
                built.append(b)
                total.append(d)
        wait_for_closes()
        out["cold_boot_ms"] = round(statistics.median(cold_s) * 1e3, 3)
        for mode, (built, total) in res.items():
            med = statistics.median(total)
            out[f"restore_{mode}"] = {
                "restore_ms": round(statistics.median(built) * 1e3, 3),
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
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["loadavg_before_after"] = [list(load_before), list(os.getloadavg())]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
