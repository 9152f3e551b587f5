"""Kernel same-page merging (KSM): control, statistics and per-page probes.

KSM merges only what a process marks MADV_MERGEABLE, and only private
anonymous memory (a memfd MAP_SHARED mapping is never merged). This module
is the host side hvkit needs to use it honestly:

* ``ksm_status()`` says whether KSM exists and whether this process may
  drive it, with the reason when it cannot;
* ``KsmTuning`` sets ``run``/``pages_to_scan``/``sleep_millisecs`` for the
  duration of a block and puts the previous values back afterwards (the
  sysfs knobs are host-wide, so a test or benchmark must not leave them
  changed);
* ``read_stats()`` / ``process_stat()`` read /sys/kernel/mm/ksm and
  /proc/<pid>/ksm_stat;
* ``KsmPageProbe`` tells, page by page, whether a host virtual page is a
  KSM page (pagemap + kpageflags, root only): the only exact way to check
  that exactly the chosen pages merged and nothing else did.
"""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Iterable

from hvkit.errors import HvkitError

KSM_DIR = "/sys/kernel/mm/ksm"
PAGE_SIZE = 4096
MADV_MERGEABLE = getattr(mmap, "MADV_MERGEABLE", 12)
MADV_UNMERGEABLE = getattr(mmap, "MADV_UNMERGEABLE", 13)

KPF_KSM = 21
PM_PRESENT = 1 << 63
PM_PFN_MASK = (1 << 55) - 1

# The knobs KsmTuning may change (others are left to the administrator).
TUNABLES = ("run", "pages_to_scan", "sleep_millisecs")
# Held while a KsmTuning is active, so that two processes tuning at once
# cannot restore each other's values and leave the host changed.
TUNING_LOCK = "/run/lock/hvkit-ksm-tuning.lock"


class KsmError(HvkitError):
    """KSM is missing, not writable, or refused a request."""


@dataclass(frozen=True)
class KsmStatus:
    available: bool
    writable: bool
    reason: str = ""

    @property
    def usable(self) -> bool:
        return self.available and self.writable


def ksm_status(ksm_dir: str = KSM_DIR) -> KsmStatus:
    """Whether KSM exists on this host and this process may tune it."""
    run = os.path.join(ksm_dir, "run")
    if not os.path.exists(run):
        return KsmStatus(False, False, f"{run} does not exist: the kernel is built "
                                       "without CONFIG_KSM")
    if not os.access(run, os.W_OK):
        return KsmStatus(True, False, f"{run} is not writable by this process "
                                      "(KSM is controlled by root)")
    return KsmStatus(True, True)


def require_ksm(ksm_dir: str = KSM_DIR) -> None:
    """Raise KsmError naming why KSM cannot be used here."""
    st = ksm_status(ksm_dir)
    if not st.usable:
        raise KsmError(f"KSM is not usable: {st.reason}")


@dataclass
class KsmStats:
    """A snapshot of /sys/kernel/mm/ksm (counters are host-wide)."""

    pages_shared: int = 0      # KSM pages in use (one per distinct content)
    pages_sharing: int = 0     # how many more sites share them: the pages saved
    pages_unshared: int = 0
    pages_volatile: int = 0
    full_scans: int = 0
    pages_scanned: int = 0
    general_profit: int | None = None   # bytes saved net of KSM metadata (5.19+)
    ksm_zero_pages: int = 0
    run: int = 0
    pages_to_scan: int = 0
    sleep_millisecs: int = 0
    raw: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def saved_bytes(self) -> int:
        return self.pages_sharing * PAGE_SIZE


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().split()
    except OSError:
        return None
    if not text:
        return None
    try:
        return int(text[0])
    except ValueError:
        return None


def read_stats(ksm_dir: str = KSM_DIR) -> KsmStats:
    """Read every numeric file of the KSM sysfs directory."""
    if not os.path.isdir(ksm_dir):
        raise KsmError(f"{ksm_dir} does not exist: the kernel is built without CONFIG_KSM")
    raw: dict[str, int] = {}
    for name in sorted(os.listdir(ksm_dir)):
        value = _read_int(os.path.join(ksm_dir, name))
        if value is not None:
            raw[name] = value
    stats = KsmStats(raw=raw)
    for name in ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                 "full_scans", "pages_scanned", "general_profit", "ksm_zero_pages",
                 "run", "pages_to_scan", "sleep_millisecs"):
        if name in raw:
            setattr(stats, name, raw[name])
    return stats


def process_stat(pid: int | str = "self") -> dict[str, int | str]:
    """/proc/<pid>/ksm_stat (ksm_rmap_items, ksm_merging_pages,
    ksm_process_profit, ...): what KSM does for one process. Empty where the
    kernel has no such file (before 6.1)."""
    path = f"/proc/{pid}/ksm_stat"
    out: dict[str, int | str] = {}
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        key, _, value = line.partition(" ")
        key, value = key.rstrip(":"), value.strip()
        try:
            out[key] = int(value)
        except ValueError:
            out[key] = value
    return out


class ScanAnchor:
    """One private page of this process marked MADV_MERGEABLE.

    ksmd sleeps, and its full_scans counter stands still, while no process
    has mergeable memory; holding an anchor guarantees it has something to
    scan, so a wait for full scans always ends where KSM runs."""

    def __init__(self) -> None:
        self._map: mmap.mmap | None = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE
                                                | mmap.MAP_ANONYMOUS)
        self._map[:8] = os.urandom(8)      # present, and unlike any other page
        try:
            madvise(self._map, 0, PAGE_SIZE, MADV_MERGEABLE)
        except KsmError:
            self.close()
            raise

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None

    def __enter__(self) -> "ScanAnchor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_full_scans(n: int = 1, timeout: float = 30.0, ksm_dir: str = KSM_DIR) -> int:
    """Wait until ksmd has completed ``n`` more full scans; returns the
    count reached. Merging needs at least two scans of a page (KSM only
    merges content that stayed the same from one scan to the next).

    A ``ScanAnchor`` is held meanwhile: ksmd does not scan at all while no
    process has mergeable memory, so without one the wait could never end."""
    start = read_stats(ksm_dir)
    if not start.run:
        raise KsmError("KSM is stopped (run=0): no scan will happen; use KsmTuning(run=1)")
    deadline = time.monotonic() + timeout
    with ScanAnchor():
        while True:
            now = read_stats(ksm_dir).full_scans
            if now >= start.full_scans + n:
                return now
            if time.monotonic() > deadline:
                raise KsmError(f"ksmd finished {now - start.full_scans} of {n} full scans "
                               f"within {timeout} s (pages_to_scan and sleep_millisecs "
                               f"set how fast it scans)")
            time.sleep(0.01)


class KsmTuning:
    """Set KSM knobs for the duration of a ``with`` block, then restore them.

    >>> with KsmTuning(pages_to_scan=10000, sleep_millisecs=0):
    ...     ...   # ksmd runs flat out; the old values come back afterwards

    ``run`` defaults to 1 (ksmd scanning). The previous values are read
    before anything is written, and restored even if the block raises.
    Tunings in different processes take turns (a lock file, waited on for
    up to ``lock_timeout`` s); they do not nest within one process.
    """

    def __init__(self, *, run: int | None = 1, pages_to_scan: int | None = None,
                 sleep_millisecs: int | None = None, ksm_dir: str = KSM_DIR,
                 lock_timeout: float = 300.0) -> None:
        self.ksm_dir = ksm_dir
        self.lock_timeout = lock_timeout
        self._lock_fd = -1
        self.values: dict[str, int] = {}
        for name, value in (("run", run), ("pages_to_scan", pages_to_scan),
                            ("sleep_millisecs", sleep_millisecs)):
            if value is None:
                continue
            if not isinstance(value, int) or value < 0:
                raise KsmError(f"KSM {name} must be a non-negative integer, got {value!r}")
            self.values[name] = value
        if self.values.get("run", 0) not in (0, 1):
            raise KsmError(f"KSM run must be 0 or 1 here (2 unmerges everything on "
                           f"the host), got {self.values['run']}")
        self.saved: dict[str, int] = {}

    def _write(self, name: str, value: int) -> None:
        path = os.path.join(self.ksm_dir, name)
        try:
            with open(path, "w") as f:
                f.write(str(value))
        except OSError as exc:
            raise KsmError(f"cannot write {value} to {path}: {exc.strerror}") from exc

    def _acquire(self) -> None:
        path = TUNING_LOCK if os.path.isdir(os.path.dirname(TUNING_LOCK)) else \
            os.path.join("/tmp", os.path.basename(TUNING_LOCK))
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise KsmError(f"another process has held the KSM tuning lock {path} "
                                   f"for over {self.lock_timeout} s") from None
                time.sleep(0.05)
        self._lock_fd = fd

    def _release(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)   # closing drops the flock
            self._lock_fd = -1

    def __enter__(self) -> "KsmTuning":
        require_ksm(self.ksm_dir)
        self._acquire()
        try:
            self._save_and_apply()
        except BaseException:
            self._release()
            raise
        return self

    def set(self, **values: int) -> None:
        """Change knobs inside the block (``t.set(run=1)``); the values found
        on entry still come back at the end."""
        for name, value in values.items():
            if name not in self.saved:
                raise KsmError(f"KSM {name} was not named when this tuning began, so it "
                               f"would not be restored; name it in KsmTuning(...)")
            if not isinstance(value, int) or value < 0 or (name == "run" and value > 1):
                raise KsmError(f"KSM {name}={value!r} refused")
            self._write(name, value)

    def _save_and_apply(self) -> None:
        for name in self.values:
            value = _read_int(os.path.join(self.ksm_dir, name))
            if value is None:
                raise KsmError(f"cannot read {os.path.join(self.ksm_dir, name)}")
            self.saved[name] = value
        try:
            # Scan rate first, then run, so ksmd never starts at the old rate.
            for name in sorted(self.values, key=lambda n: n == "run"):
                self._write(name, self.values[name])
        except BaseException:
            self.restore()
            raise

    def restore(self) -> None:
        """Put back the values found on entry (run first: ksmd stops before
        its rate changes back)."""
        errors = []
        for name in sorted(self.saved, key=lambda n: n != "run"):
            try:
                self._write(name, self.saved[name])
            except KsmError as exc:
                errors.append(str(exc))
        self.saved.clear()
        if errors:
            raise KsmError("; ".join(errors))

    def __exit__(self, *exc: object) -> None:
        try:
            self.restore()
        finally:
            self._release()


def madvise(mapping: mmap.mmap, offset: int, length: int, advice: int) -> None:
    """madvise() on [offset, offset+length) of a mapping, page-aligned."""
    if offset % PAGE_SIZE or length % PAGE_SIZE or offset < 0 or length <= 0:
        raise KsmError(f"madvise range [{offset:#x}, +{length:#x}) is not a positive "
                       f"page-aligned range")
    if offset + length > len(mapping):
        raise KsmError(f"madvise range [{offset:#x}, {offset + length:#x}) is outside "
                       f"the {len(mapping):#x}-byte mapping")
    try:
        mapping.madvise(advice, offset, length)
    except OSError as exc:
        what = {MADV_MERGEABLE: "MADV_MERGEABLE", MADV_UNMERGEABLE: "MADV_UNMERGEABLE"}
        hint = ""
        if exc.errno == errno.EINVAL and advice == MADV_MERGEABLE:
            hint = " (KSM merges only private anonymous memory; is the region memfd-backed?)"
        elif exc.errno == errno.ENOMEM:
            hint = " (too many mappings: vm.max_map_count reached?)"
        raise KsmError(f"madvise({what.get(advice, advice)}) on [{offset:#x}, "
                       f"{offset + length:#x}) failed: {exc.strerror}{hint}") from exc


class KsmPageProbe:
    """Which host virtual pages are KSM pages right now.

    Reads /proc/self/pagemap for the page frame numbers and
    /proc/kpageflags for their KPF_KSM bit. Both need root (CAP_SYS_ADMIN);
    without it the PFNs read as zero and the probe refuses to guess.
    """

    def __init__(self, pid: int | str = "self") -> None:
        try:
            self._pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
        except OSError as exc:
            raise KsmError(f"cannot open /proc/{pid}/pagemap: {exc.strerror}") from exc
        try:
            self._kpageflags = os.open("/proc/kpageflags", os.O_RDONLY)
        except OSError as exc:
            os.close(self._pagemap)
            raise KsmError(f"cannot open /proc/kpageflags ({exc.strerror}): per-page "
                           f"KSM probing needs root") from exc

    def pfns(self, addr: int, npages: int) -> list[int]:
        """PFN of each page (0 where the page is not present)."""
        if addr % PAGE_SIZE:
            raise KsmError(f"address {addr:#x} is not page-aligned")
        data = os.pread(self._pagemap, npages * 8, (addr // PAGE_SIZE) * 8)
        entries = struct.unpack(f"<{len(data) // 8}Q", data)
        out = [e & PM_PFN_MASK if e & PM_PRESENT else 0 for e in entries]
        if any(e & PM_PRESENT and not e & PM_PFN_MASK for e in entries):
            raise KsmError("pagemap hides page frame numbers from this process: "
                           "per-page probing needs CAP_SYS_ADMIN")
        return out

    def flags(self, pfn: int) -> int:
        data = os.pread(self._kpageflags, 8, pfn * 8)
        return struct.unpack("<Q", data)[0] if len(data) == 8 else 0

    def ksm_pages(self, addr: int, npages: int) -> list[bool]:
        """For each page of [addr, addr + npages pages): is it a KSM page?"""
        pfns = self.pfns(addr, npages)
        cache: dict[int, bool] = {}
        out = []
        for pfn in pfns:
            if not pfn:
                out.append(False)
                continue
            hit = cache.get(pfn)
            if hit is None:
                hit = cache[pfn] = bool(self.flags(pfn) >> KPF_KSM & 1)
            out.append(hit)
        return out

    def count(self, addr: int, npages: int) -> int:
        return sum(self.ksm_pages(addr, npages))

    def close(self) -> None:
        for fd in (self._pagemap, self._kpageflags):
            if fd >= 0:
                os.close(fd)
        self._pagemap = self._kpageflags = -1

    def __enter__(self) -> "KsmPageProbe":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def shared_pfns(probe: KsmPageProbe, ranges: Iterable[tuple[int, int]]) -> set[int]:
    """PFNs present in every one of several host ranges (addr, npages):
    the frames that distinct VMs share after a merge."""
    sets = [set(p for p in probe.pfns(a, n) if p) for a, n in ranges]
    return set.intersection(*sets) if sets else set()
