"""What the disk benchmarks share: the host's CPU time, the guest TSC rate,
percentiles and a fully written test file. Imported from the benchmark
scripts' own directory (they run as ``python benchmarks/NAME.py``)."""
from __future__ import annotations

import os


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return total - idle, total


def tsc_hz() -> float:
    """The TSC rate a guest sees (the host's here), in Hz."""
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


def fill(path: str, size: int) -> None:
    """Write every page once, so that reads (the guest's and fio's) hit
    allocated blocks rather than holes the file system answers from zeros."""
    chunk = os.urandom(1 << 20)
    with open(path, "r+b") as f:
        for off in range(0, size, len(chunk)):
            f.write(chunk[:min(len(chunk), size - off)])
        f.flush()
        os.fsync(f.fileno())
