#!/usr/bin/env python3
"""A restored Linux microVM against a cold boot of the same one, in one run.

    python benchmarks/linux_restore.py [--ages 0,30] [--restores 3]

The guest is the hvkit kernel with a busybox initramfs whose init prints a
marker and then runs the lines typed on its console in one shell. Baseline:
the cold boot, from MicroVM() to the marker. Then the VM is saved at the
marker and restored (copy-on-write) at each snapshot age in ``--ages``
(seconds after the snapshot was taken: a restored guest's clock jumps by
that much on hosts that ignore guest TSC writes), and timed from
MicroVM.restore() to the answer to a shell builtin (``echo``) and to a
command that forks and execs (``expr``).

Prints one JSON object: the cold boot, the restore timings per age, the
ratio cold boot / answer, the load average and the kernel used. Needs
/dev/kvm and the hvkit guest kernel (HVKIT_LINUX_DIR, or built with
guests/linux/build.sh).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

from benchlib import kernel_dir

import hvkit
from hvkit.boot.initramfs import busybox_initramfs, init_script
from hvkit.machine import MicroVM

READY = b"HVKIT-RESTORE-READY"


def wait_for(vm: MicroVM, text: bytes, start: int, timeout: float) -> float:
    end = time.monotonic() + timeout
    while text not in vm.console_output[start:]:
        if vm.finished.is_set() or time.monotonic() > end:
            raise RuntimeError(f"no {text!r} on the console: {vm.console_output[-400:]!r}")
        time.sleep(0.001)
    return time.perf_counter()


def answer(vm: MicroVM, line: bytes, expect: bytes, t0: float, timeout: float) -> float:
    start = len(vm.console_output)
    vm.send_input(line + b"\n")
    return wait_for(vm, expect, start, timeout) - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ages", default="0,30",
                    help="snapshot ages (s) to restore at, comma-separated")
    ap.add_argument("--restores", type=int, default=3, help="restores per age")
    ap.add_argument("--memory", default="256M")
    ap.add_argument("--timeout", type=float, default=900.0)
    args = ap.parse_args()
    kdir = kernel_dir()
    vmlinux = os.path.join(kdir, "vmlinux")
    text = init_script(marker=READY.decode(),
                       commands=["while read -r line; do eval \"$line\"; done"],
                       run_cmdline_arg=None)
    initrd = busybox_initramfs(init_script_text=text)
    load_before = os.getloadavg()
    tmp = tempfile.mkdtemp(prefix="hvkit-linux-restore-")
    out: dict = {"benchmark": "linux_restore", "hvkit": hvkit.__version__,
                 "kernel": kdir, "memory": args.memory}
    try:
        t0 = time.perf_counter()
        vm = MicroVM(kernel=vmlinux, initrd=initrd, memory=args.memory,
                     cmdline="console=ttyS0 reboot=k panic=-1")
        try:
            vm.start()
            cold = wait_for(vm, READY, 0, args.timeout) - t0
            time.sleep(0.5)          # let the shell reach its read
            vm.pause()
            t = time.perf_counter()
            snap = os.path.join(tmp, "linux")
            vm.snapshot(snap)
            out["snapshot_ms"] = round((time.perf_counter() - t) * 1e3, 1)
        finally:
            vm.close()
        taken = time.monotonic()
        out["cold_boot_s"] = round(cold, 2)
        ages = {}
        for age in [float(a) for a in args.ages.split(",") if a]:
            runs = []
            for i in range(args.restores):
                time.sleep(max(0.0, taken + age - time.monotonic()))
                t0 = time.perf_counter()
                vm = MicroVM.restore(snap)
                try:
                    restored = time.perf_counter() - t0
                    vm.start()
                    builtin = answer(vm, b"echo $((6*7))B%d" % i, b"42B%d" % i, t0, args.timeout)
                    t1 = time.perf_counter()
                    forked = answer(vm, b"expr 6 \\* %d" % (8 + i), b"%d\r" % (6 * (8 + i)),
                                    t1, args.timeout)
                finally:
                    vm.close()
                runs.append({"age_s": round(time.monotonic() - taken, 1),
                             "restore_ms": round(restored * 1e3, 2),
                             "echo_answer_s": round(builtin, 3),
                             "fork_exec_answer_s": round(forked, 3)})
            med = statistics.median(r["echo_answer_s"] for r in runs)
            ages[f"{age:g}"] = {"runs": runs, "echo_answer_median_s": med,
                                "ratio_cold_over_echo_answer": round(cold / med, 1)}
        out["restores_by_age"] = ages
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["loadavg_before_after"] = [list(load_before), list(os.getloadavg())]
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
