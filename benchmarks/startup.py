#!/usr/bin/env python3
"""MicroVM start-up: time to the first console byte, and VMs per second.

1. Latency: wall time from calling MicroVM("hello", memory="64M") to the
   first byte the guest writes on its serial console, over --runs runs
   (median, p99). The console is the write end of a pipe; after start() the
   main thread blocks in select() on the read end, so the clock stops when
   the kernel wakes it, with no extra thread and no polling interval. The
   UART is served in C, so the byte reaches the pipe straight from the vCPU
   thread. Each run is split into phases (construct, start, first byte,
   wait for exit, close) so a slow figure says where it comes from.

2. Throughput: the whole process pinned to one CPU (os.sched_setaffinity;
   vCPU threads inherit it), microVMs built, run to their exit and closed
   back to back for --seconds: VMs started and finished per second. Also
   with close() handed to a reaper thread (still on the same core; the
   timing ends when the last VM is closed), because a VM's teardown here is
   mostly waiting in the kernel, not CPU.

Baseline, in the same run and the same process: the bare kernel cost of a
VM of the same shape, made with raw ioctls (fcntl) and no hvkit: open
/dev/kvm, KVM_CREATE_VM, in-kernel irqchip and PIT, a 64 MiB memfd slot,
one vCPU with its kvm_run mapped, then close it all (also reported without
the irqchip and PIT, whose teardown dominates). That is the floor any VMM on this host pays;
the ratios say how much hvkit adds on top. (QEMU microvm is not used: it
cannot boot hvkit's freestanding guests, so it would not measure the same
thing.)

--profile adds the top functions by cumulative time (cProfile) over the
latency runs.

Prints one JSON object. Needs /dev/kvm.
"""
from __future__ import annotations

import argparse
import cProfile
import fcntl
import io
import json
import mmap
import os
import platform
import pstats
import queue
import select
import statistics
import struct
import sys
import threading
import time

from hvkit.machine import MicroVM

GUEST = "hello"
MEMORY = 64 << 20
#: issue 10's target (1.5 ms) over the bare create it was measured beside (0.54 ms)
RATIO_TARGET = round(1.5 / 0.54, 2)

# KVM ioctl numbers (linux/kvm.h), for the hvkit-free baseline.
KVM_CREATE_VM = 0xAE01
KVM_CREATE_VCPU = 0xAE41
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_CREATE_IRQCHIP = 0xAE60
KVM_CREATE_PIT2 = 0x4040AE77


def percentile(xs: list[float], p: float) -> float:
    s = sorted(xs)
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def ms(x: float) -> float:
    return round(x * 1e3, 3)


class Reaper:
    """Closes VMs on a thread of its own. Tearing down a KVM VM with an
    in-kernel irqchip waits for RCU grace periods (~10 ms here) but uses
    almost no CPU, so a caller that hands close() off starts the next VM
    at once."""

    def __init__(self) -> None:
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="vm-reaper", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (vm := self.q.get()) is not None:
            vm.close()

    def close(self, vm: MicroVM) -> None:
        self.q.put(vm)

    def join(self) -> None:
        self.q.put(None)
        self.thread.join()


def hvkit_once(reaper: Reaper | None = None) -> dict[str, float]:
    """One microVM, timed by phase; returns seconds since construction began."""
    r, w = os.pipe()
    try:
        t0 = time.perf_counter()
        vm = MicroVM(GUEST, memory=MEMORY, console=w)
        t_built = time.perf_counter()
        try:
            vm.start()
            t_started = time.perf_counter()
            ready, _, _ = select.select([r], [], [], 10)
            t_byte = time.perf_counter()
            if not ready:
                raise SystemExit("no console byte within 10 s")
            code = vm.wait(10)
            t_exit = time.perf_counter()
        finally:
            if reaper is not None:
                reaper.close(vm)
            else:
                vm.close()
        t_closed = time.perf_counter()
        if code != 0:
            raise SystemExit(f"{GUEST} exited with {code}")
        return {"construct": t_built - t0, "start": t_started - t_built,
                "first_byte": t_byte - t0, "exit": t_exit - t0, "total": t_closed - t0,
                "close": t_closed - t_exit,
                **{f"build_{k}": v for k, v in vm.timings.items()}}
    finally:
        os.close(r)
        os.close(w)


def bare_once(irqchip: bool = True, split: list | None = None) -> float:
    """The same VM shape with raw ioctls: create, then destroy. Seconds.

    With ``irqchip`` it has what a MicroVM has in the kernel (in-kernel
    PIC/IOAPIC/LAPIC and PIT): its teardown then waits for an SRCU grace
    period, which is most of a VM's lifetime cost on this host."""
    t0 = time.perf_counter()
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    memfd = os.memfd_create("bare-ram", os.MFD_CLOEXEC)
    os.ftruncate(memfd, MEMORY)
    ram = mmap.mmap(memfd, MEMORY, mmap.MAP_SHARED)
    import ctypes
    hva = ctypes.addressof(ctypes.c_char.from_buffer(ram))
    fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, struct.pack("<IIQQQ", 0, 0, 0, MEMORY, hva))
    # The order MicroVM uses: a slot set after the irqchip exists waits for
    # an SRCU grace period (~7 ms here); before it, the wait moves to close.
    if irqchip:
        fcntl.ioctl(vm, KVM_CREATE_IRQCHIP, 0)
        fcntl.ioctl(vm, KVM_CREATE_PIT2, bytes(64))
    vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
    size = fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0)
    run = mmap.mmap(vcpu, size, mmap.MAP_SHARED)
    if split is not None:
        split.append(time.perf_counter() - t0)      # created: the latency baseline
    run.close()
    os.close(vcpu)
    os.close(vm)
    del hva
    try:
        ram.close()
    except BufferError:
        pass
    os.close(memfd)
    os.close(kvm)
    return time.perf_counter() - t0


def throughput(fn, seconds: float, finish=None) -> tuple[float, int]:
    """Calls of ``fn`` per second; ``finish`` (if any) runs inside the timing."""
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    if finish is not None:
        finish()
    return n / (time.perf_counter() - t0), n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=5.0, help="per throughput measurement")
    ap.add_argument("--cpu", type=int, default=None, help="CPU to pin to (default: the last allowed)")
    ap.add_argument("--profile", action="store_true")
    opts = ap.parse_args()

    # Warm-up: imports, the /dev/kvm handle and its cached CPUID, page cache.
    for _ in range(3):
        hvkit_once()
        bare_once()

    prof = cProfile.Profile() if opts.profile else None
    runs, bare, bare_plain, bare_create = [], [], [], []
    for _ in range(opts.runs):          # interleaved, so drift hits both alike
        if prof:
            prof.enable()
        runs.append(hvkit_once())
        if prof:
            prof.disable()
        bare.append(bare_once(split=bare_create))
        bare_plain.append(bare_once(irqchip=False))

    allowed = sorted(os.sched_getaffinity(0))
    cpu = opts.cpu if opts.cpu is not None else allowed[-1]
    os.sched_setaffinity(0, {cpu})
    try:
        vms_per_s, vms = throughput(hvkit_once, opts.seconds)
        reaper = Reaper()
        bg_per_s, bg_vms = throughput(lambda: hvkit_once(reaper), opts.seconds, reaper.join)
        bare_per_s, bares = throughput(bare_once, opts.seconds)
    finally:
        os.sched_setaffinity(0, allowed)

    phases = {k: {"median_ms": ms(statistics.median(r[k] for r in runs)),
                  "p99_ms": ms(percentile([r[k] for r in runs], 99))}
              for k in ("construct", "start", "first_byte", "exit", "close", "total")}
    build = {k[6:]: ms(statistics.median(r.get(k, 0.0) for r in runs))
             for k in runs[0] if k.startswith("build_")}
    first = [r["first_byte"] for r in runs]
    result = {
        "benchmark": "microvm startup", "guest": GUEST, "memory_mib": MEMORY >> 20, "vcpus": 1,
        "runs": opts.runs,
        "first_console_byte_ms": {"median": ms(statistics.median(first)),
                                  "p99": ms(percentile(first, 99)),
                                  "min": ms(min(first)), "target_median": 1.5,
                                  "target_met": statistics.median(first) <= 0.0015},
        "phases_since_construct_ms": phases,
        "build_phases_median_ms": build,
        "loadavg": list(os.getloadavg()),
        "one_core": {"cpu": cpu, "seconds": opts.seconds,
                     "vms_per_s": round(vms_per_s, 1), "vms": vms, "target": 50,
                     "target_met": vms_per_s >= 50,
                     "vms_per_s_close_on_reaper_thread": round(bg_per_s, 1),
                     "vms_close_on_reaper_thread": bg_vms},
        "baseline_bare_kvm": {
            "what": "raw ioctls: KVM_CREATE_VM + irqchip + PIT2 + 64 MiB memfd slot + 1 vCPU + kvm_run mmap, then close",
            "create_ms": {"median": ms(statistics.median(bare_create)),
                          "p99": ms(percentile(bare_create, 99))},
            "create_destroy_ms": {"median": ms(statistics.median(bare)),
                                  "p99": ms(percentile(bare, 99))},
            "per_s_one_core": round(bare_per_s, 1), "count": bares,
            "create_destroy_ms_without_irqchip_pit": {
                "median": ms(statistics.median(bare_plain)),
                "p99": ms(percentile(bare_plain, 99))}},
        "ratio_first_byte_to_bare_create": round(statistics.median(first)
                                                 / statistics.median(bare_create), 2),
        # The 1.5 ms target was set where a bare create took 0.54 ms; on a
        # busier or slower host the ratio is what carries over.
        "target_ratio_first_byte_to_bare_create": RATIO_TARGET,
        "ratio_target_met": statistics.median(first)
        <= RATIO_TARGET * statistics.median(bare_create),
        "ratio_vms_per_s_to_bare": round(vms_per_s / bare_per_s, 3),
        "ratio_vms_per_s_reaper_to_bare": round(bg_per_s / bare_per_s, 3),
        "host": {"kernel": platform.release(), "cpus": os.cpu_count(),
                 "python": platform.python_version()},
    }
    if prof:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(25)
        result["profile_top"] = [l.rstrip() for l in out.getvalue().splitlines()
                                 if l.strip() and "function calls" not in l][:40]
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
