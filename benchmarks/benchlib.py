"""What the benchmarks share: the host's CPU time, the guest TSC rate,
percentiles, a fully written test file and the hvkit guest kernel. Imported from the benchmark
scripts' own directory (they run as ``python benchmarks/NAME.py``)."""
from __future__ import annotations

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kernel_dir() -> str:
    """The hvkit guest kernel: $HVKIT_LINUX_DIR, else built (cached) by
    guests/linux/build.sh."""
    d = os.environ.get("HVKIT_LINUX_DIR")
    if d:
        return d
    out = subprocess.run(["bash", os.path.join(ROOT, "guests/linux/build.sh"), "--print-dir"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


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


class Load:
    """The load average before and after a block, and the CPUs' busy share
    over it: every figure is read against how busy the host was."""

    def __enter__(self) -> "Load":
        self.t0, self.avg0 = cpu_times(), os.getloadavg()
        return self

    def __exit__(self, *exc: object) -> None:
        b1, t1 = cpu_times()
        self.busy = round((b1 - self.t0[0]) / max(t1 - self.t0[1], 1), 3)
        self.avg1 = os.getloadavg()

    def record(self) -> dict:
        return {"cpu_busy": self.busy,
                "loadavg": [[round(x, 2) for x in self.avg0], [round(x, 2) for x in self.avg1]]}


def git_revision() -> str | None:
    """The commit of the benchmarks' own tree, if it is a git checkout."""
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        return subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def emit(report: dict, output: str | None) -> None:
    """Print a benchmark's JSON report, with what was measured (hvkit's
    version, path and revision; the CPUs; the load at the end) added, and
    write it to ``output`` as well when given."""
    import json
    import hvkit
    report = {**report,
              "hvkit": {"version": getattr(hvkit, "__version__", None),
                        "path": os.path.dirname(hvkit.__file__), "git": git_revision()},
              "cpus": os.cpu_count(),
              "loadavg_end": [round(x, 2) for x in os.getloadavg()]}
    text = json.dumps(report, indent=2)
    print(text)
    if output:
        with open(output, "w") as f:
            f.write(text + "\n")
