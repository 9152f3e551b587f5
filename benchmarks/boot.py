"""Linux boot: the hvkit microVM kernel and a busybox initramfs booted by
hvkit and by QEMU's microvm machine in the same run.

    python benchmarks/boot.py [--runs 3] [--kernel vmlinux|bzImage] [--no-qemu]

Times, from process/VM start: the init marker on the console, and the VM's
exit. Both VMMs get the same kernel, initramfs and command line (with this
host's profile: on nested PVM hosts kernel code is emulated, which is what
dominates the time). For hvkit it also reports VM exits by reason. Prints
one JSON object with the ratio (QEMU time / hvkit time: above 1 means hvkit
is faster).
"""
from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import kernel_dir

from hvkit.arch.x86.profiles import select_profile
from hvkit.boot.initramfs import MARKER, busybox_initramfs
from hvkit.machine import MicroVM

BASE = "console=ttyS0 reboot=k panic=-1"
RUN = 'hvkit.run="exit 3"'


def boot_hvkit(kernel: str, initrd: bytes, cmdline: str) -> dict:
    t0 = time.monotonic()
    vm = MicroVM(kernel=kernel, initrd=initrd, cmdline=cmdline, memory="256M",
                 host_profile="none")
    vm.start()
    marker = None
    while not vm.finished.wait(0.01):
        if marker is None and MARKER.encode() in vm.console_output:
            marker = time.monotonic() - t0
    code = vm.wait(0)
    total = time.monotonic() - t0
    if marker is None and MARKER.encode() in vm.console_output:
        marker = total
    counts = vm.exit_counts()
    kvm_exits = vm.kvm_exits()
    vm.close()
    return {"marker_s": marker, "exit_s": total, "exit_code": code,
            "exits_by_reason": counts, "kvm_exits": kvm_exits}


def boot_qemu(kernel: str, initrd_path: str, cmdline: str) -> dict:
    argv = ["qemu-system-x86_64", "-M", "microvm", "-enable-kvm", "-cpu",
            "host,-arch-capabilities", "-m", "256", "-nographic", "-no-reboot",
            "-device", "i8042", "-kernel", kernel, "-initrd", initrd_path, "-append", cmdline]
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    buf, marker = b"", None
    while True:
        r, _, _ = select.select([p.stdout], [], [], 1.0)
        if r:
            chunk = os.read(p.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            if marker is None and MARKER.encode() in buf:
                marker = time.monotonic() - t0
        elif p.poll() is not None:
            break
    p.wait()
    return {"marker_s": marker, "exit_s": time.monotonic() - t0, "exit_code": p.returncode}


def med(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return round(statistics.median(vals), 3) if vals else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--kernel", default="vmlinux", choices=("vmlinux", "bzImage"))
    ap.add_argument("--no-qemu", action="store_true")
    a = ap.parse_args()
    kernel = os.path.join(kernel_dir(), a.kernel)
    initrd = busybox_initramfs()
    from hvkit.kvm import Kvm
    with Kvm() as kvm:
        vm = kvm.create_vm()
        khz = vm.create_vcpu(0).get_tsc_khz()
        vm.close()
    profile = select_profile("auto", khz)
    cmdline = profile.apply_cmdline(f"{BASE} {RUN}")
    tmp = tempfile.mkdtemp(prefix="hvkit-boot-")
    rd_path = os.path.join(tmp, "initrd.cpio")
    with open(rd_path, "wb") as f:
        f.write(initrd)
    hv, qm = [], []
    have_qemu = shutil.which("qemu-system-x86_64") is not None and not a.no_qemu
    try:
        for i in range(a.runs):
            print(f"boot: run {i + 1}/{a.runs} hvkit", file=sys.stderr)
            hv.append(boot_hvkit(kernel, initrd, cmdline))
            if have_qemu:
                print(f"boot: run {i + 1}/{a.runs} qemu", file=sys.stderr)
                qm.append(boot_qemu(kernel, rd_path, cmdline))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = {
        "kernel": kernel, "host_profile": profile.name, "cmdline": cmdline, "runs": a.runs,
        "hvkit": {"marker_s_median": med(hv, "marker_s"), "exit_s_median": med(hv, "exit_s"),
                  "exit_codes": [r["exit_code"] for r in hv],
                  "exits_by_reason_last_run": hv[-1]["exits_by_reason"],
                  "kvm_exits_last_run": hv[-1]["kvm_exits"]},
    }
    if qm:
        out["qemu_microvm"] = {"marker_s_median": med(qm, "marker_s"),
                               "exit_s_median": med(qm, "exit_s"),
                               "exit_codes": [r["exit_code"] for r in qm]}
        h, q = out["hvkit"]["marker_s_median"], out["qemu_microvm"]["marker_s_median"]
        out["ratio_qemu_over_hvkit_marker"] = round(q / h, 3) if h and q else None
        h, q = out["hvkit"]["exit_s_median"], out["qemu_microvm"]["exit_s_median"]
        out["ratio_qemu_over_hvkit_exit"] = round(q / h, 3) if h and q else None
        out["hvkit_faster"] = (out["ratio_qemu_over_hvkit_exit"] or 0) > 1
    else:
        out["qemu_microvm"] = "not measured: qemu-system-x86_64 is not installed"
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
