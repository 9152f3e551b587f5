"""Selective deduplication: the guest chooses which pages KSM may merge.

Whole-VM merging (QEMU's mem-merge: MADV_MERGEABLE on all of guest RAM)
makes ksmd scan every guest page, merges pages the guest never meant to
share (a side channel across VMs) and cannot be steered by the guest. Here
the guest's OS keeps a *mergeable window* of guest-physical memory, moves
the pages its applications nominate into it, and says by hypercall which
window pages are mergeable; the host marks MADV_MERGEABLE on exactly the
host pages behind them, and nothing else.

Backing. KSM merges only private anonymous memory, so the window must lie
in a ``backing="anonymous"`` region (``MicroVM(memory_backing="anonymous")``).
The price: such RAM cannot be shared with another process (an NVMe
accelerator maps memfd regions), and a merged page costs the guest a
copy-on-write fault on its next write. Keep shared-with-backend memory in
memfd regions and dedup candidates in anonymous ones.

Access detection: dirty logging. A nominated page is marked mergeable only
once the guest has written it (an untouched page has no host memory to
merge, and marking it early would only make ksmd scan it). The window gets
a slot of its own with KVM_MEM_LOG_DIRTY_PAGES, so:

* no exit to user space ever happens for it: KVM sets a bit on the first
  write, and the host reads the bitmap when it wants (at each dedup
  hypercall and from a poller thread while nominated pages wait);
* pages the guest wrote *before* nominating them are caught too, because
  the host keeps every bit it has ever read for the window (the guest OS
  normally copies the page in first and nominates it after);
* only the window is write-tracked; the rest of RAM runs untouched.

The alternatives lose: a read-only slot turns every write into an MMIO exit
that user space must emulate (~56 us from CPL3 here) and needs a slot
split per page to stop trapping; userfaultfd sees only the first fault of a
*missing* page, not a page already present, and needs a fault-handling
thread in the VMM's data path.

Hypercalls (guest-physical addresses, 4 KiB pages; every argument is
checked and a bad one gets -EINVAL/-EFAULT/-ENOSPC, never host memory
outside the window):

=====================  ========================================================
HC_DEDUP_INFO (0x1100)  a0=0: window gpa; 1: window size; 2: pages nominated;
                        3: pages marked mergeable
HC_DEDUP_ENABLE         a0=gpa, a1=pages: nominate (idempotent)
HC_DEDUP_DISABLE        a0=gpa, a1=pages: stop merging and unmerge now
                        (MADV_UNMERGEABLE gives the VM private copies back)
=====================  ========================================================
"""
from __future__ import annotations

import errno
import re
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hvkit.devices.hypercall import Call, HypercallError
from hvkit.errors import ConfigError, HvkitError
from hvkit.memory import ksm, slots
from hvkit.memory.dirty import DirtyLog

from hvkit.vmm.attach import Attachment

if TYPE_CHECKING:
    from hvkit.memory.guest import MemoryRegion
    from hvkit.vmm.runtime import Vmm as MicroVM

PAGE_SIZE = 4096
HC_DEDUP_INFO = 0x1100
HC_DEDUP_ENABLE = 0x1101
HC_DEDUP_DISABLE = 0x1102
HC_GATE = 0x11F0

OFF, PENDING, MARKED = 0, 1, 2
_RUNS = re.compile(b"\x02+")


@dataclass
class DedupStats:
    window_pages: int
    nominated: int      # pending + marked
    pending: int        # nominated, not yet written by the guest
    marked: int         # MADV_MERGEABLE on the host
    deferred: int       # written, but held back by the mapping-count limit
    scans: int


def default_window(machine: "MicroVM", size: int | None = None) -> tuple[int, int]:
    """The top ``size`` bytes (default: half, 2 MiB-aligned) of the first
    anonymous RAM region below 4 GiB."""
    for region in machine.memory:
        if region.backing == "anonymous" and region.gpa < 1 << 32:
            want = size if size is not None else (region.size // 2) & ~((2 << 20) - 1)
            if want <= 0 or want % PAGE_SIZE or want > region.size:
                raise ConfigError(f"dedup window of {want:#x} bytes does not fit the "
                                  f"{region.size:#x}-byte region {region.name!r}")
            return region.end - want, want
    raise ConfigError("dedup needs guest RAM with backing='anonymous' (KSM merges only "
                      "private anonymous memory); build the MicroVM with "
                      "memory_backing='anonymous'")


class Dedup(Attachment):
    """Guest-directed KSM for one MicroVM (an attachment).

    >>> vm = MicroVM("dedup", memory="96M", memory_backing="anonymous")
    >>> dd = Dedup(vm, window_size=32 << 20).attach()
    >>> vm.run(...)

    ``attach()`` before ``start()`` (or while the VM is paused): it carves
    the window into its own memory slot.
    """

    def __init__(self, machine: "MicroVM", *, window: tuple[int, int] | None = None,
                 window_size: int | None = None, poll_interval: float = 0.02,
                 max_runs: int = 1024, require_ksm: bool = True) -> None:
        status = ksm.ksm_status()
        if require_ksm and not status.available:
            raise ksm.KsmError(f"selective dedup needs KSM: {status.reason}")
        self.ksm_status = status
        self.machine = machine
        gpa, size = window if window is not None else default_window(machine, window_size)
        if gpa % PAGE_SIZE or size <= 0 or size % PAGE_SIZE:
            raise ConfigError(f"dedup window [{gpa:#x}, +{size:#x}) is not page-aligned")
        try:
            region = machine.memory.region_of(gpa, size)
        except HvkitError:
            raise ConfigError(f"dedup window [{gpa:#x}, {gpa + size:#x}) is not inside "
                              f"one guest RAM region") from None
        if region.backing != "anonymous":
            raise ConfigError(f"dedup window is in region {region.name!r} with backing "
                              f"{region.backing!r}: KSM merges only private anonymous "
                              f"memory (use backing='anonymous')")
        self.region: "MemoryRegion" = region
        self.gpa, self.size = gpa, size
        self.pages = size // PAGE_SIZE
        self.offset = gpa - region.gpa           # window's offset in the region mapping
        self.poll_interval = poll_interval
        self.max_runs = max_runs
        self.state = bytearray(self.pages)       # OFF / PENDING / MARKED
        self.written = bytearray(self.pages)     # the guest has written the page
        self.deferred = 0
        self.scans = 0
        self.log: DirtyLog | None = None
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stop = False
        self._registered: list[int] = []

    name = "dedup"

    # -- lifecycle -------------------------------------------------------------
    def attach(self) -> "Dedup":
        """Attach to the VM: give the window a dirty-logged slot, register
        the hypercalls and start the poller."""
        self.machine.attach(self)
        return self

    def on_attach(self, vmm: "MicroVM") -> None:
        vm = self.machine.vm
        with slots.paused(self.machine):
            slot = slots.carve(vm, self.gpa, self.size, log_dirty=True)
        self.log = DirtyLog(vm, slot.slot)
        hc = self.machine.hypercalls
        for nr, fn, name in ((HC_DEDUP_INFO, self._hc_info, "dedup-info"),
                             (HC_DEDUP_ENABLE, self._hc_enable, "dedup-enable"),
                             (HC_DEDUP_DISABLE, self._hc_disable, "dedup-disable")):
            hc.register(nr, fn, name, owner="dedup")
            self._registered.append(nr)
        self._stop = False
        self._thread = threading.Thread(target=self._poller, name="hvkit-dedup", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.detach()

    def detach(self, unmerge: bool = True) -> None:
        """Stop the poller, drop the hypercalls, and (by default) unmerge
        every page this Dedup marked."""
        with self._wake:
            self._stop = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        for nr in self._registered:
            self.machine.hypercalls.unregister(nr)
        self._registered.clear()
        if unmerge and self.region.mapping is not None:
            self.disable(self.gpa, self.pages)
        if self.log is not None and self.machine.vm is not None:
            try:
                self.log.stop()
            except HvkitError:
                pass

    # -- guest requests ----------------------------------------------------------
    def _page_range(self, gpa: int, npages: int) -> tuple[int, int]:
        if npages <= 0 or npages > self.pages:
            raise HypercallError(errno.EINVAL, f"page count {npages} not in 1..{self.pages}")
        if gpa % PAGE_SIZE:
            raise HypercallError(errno.EINVAL, f"address {gpa:#x} is not page-aligned")
        if not (self.gpa <= gpa and gpa + npages * PAGE_SIZE <= self.gpa + self.size):
            raise HypercallError(errno.EFAULT, f"[{gpa:#x}, +{npages} pages) is outside the "
                                               f"mergeable window")
        first = (gpa - self.gpa) // PAGE_SIZE
        return first, first + npages

    def enable(self, gpa: int, npages: int) -> int:
        """Nominate window pages; they are marked mergeable once written.
        Returns how many were newly nominated."""
        lo, hi = self._page_range(gpa, npages)
        with self._wake:
            new = 0
            for i in range(lo, hi):
                if self.state[i] == OFF:
                    self.state[i] = PENDING
                    new += 1
            self._scan_locked()
            self._wake.notify_all()
        return new

    def disable(self, gpa: int, npages: int) -> int:
        """Stop merging pages and unmerge them (MADV_UNMERGEABLE copies a
        merged page back to private memory). Returns pages unmarked."""
        lo, hi = self._page_range(gpa, npages)
        with self._lock:
            marked = [i for i in range(lo, hi) if self.state[i] == MARKED]
            for start, n in _runs(marked):
                self._advise(start, n, ksm.MADV_UNMERGEABLE)
            for i in range(lo, hi):
                self.state[i] = OFF
        return len(marked)

    def unmerge_all(self) -> int:
        """Give every merged page of the window back to the VM, and stop
        merging it: for a guest about to write its whole window, say."""
        return self.disable(self.gpa, self.pages)

    def _hc_info(self, call: Call) -> int:
        what = call.args[0]
        if what == 0:
            return self.gpa
        if what == 1:
            return self.size
        st = self.stats()
        if what == 2:
            return st.nominated
        if what == 3:
            return st.marked
        raise HypercallError(errno.EINVAL, f"unknown dedup info item {what}")

    def _hc_enable(self, call: Call) -> int:
        self.enable(call.args[0], call.args[1])
        return 0

    def _hc_disable(self, call: Call) -> int:
        self.disable(call.args[0], call.args[1])
        return 0

    # -- access detection --------------------------------------------------------
    def scan(self) -> int:
        """Read the window's dirty log now and mark what became eligible."""
        with self._lock:
            return self._scan_locked()

    def _scan_locked(self) -> int:
        if self.log is None:
            return 0
        bitmap = self.log.collect_bitmap()
        self.scans += 1
        # Fold the bitmap into "written": bit i of byte b is page 8b+i.
        for b, byte in enumerate(bitmap):
            if byte:
                base = b * 8
                for bit in range(8):
                    if byte >> bit & 1 and base + bit < self.pages:
                        self.written[base + bit] = 1
        ready = [i for i in range(self.pages)
                 if self.state[i] == PENDING and self.written[i]] if PENDING in self.state else []
        if not ready:
            return 0
        runs = len(_RUNS.findall(self.state))
        accepted: list[int] = []
        self.deferred = 0
        for i in ready:
            left = i > 0 and self.state[i - 1] == MARKED
            right = i + 1 < self.pages and self.state[i + 1] == MARKED
            delta = 1 - left - right
            if runs + delta > self.max_runs:
                self.deferred += 1
                continue
            runs += delta
            self.state[i] = MARKED
            accepted.append(i)
        for start, n in _runs(accepted):
            try:
                self._advise(start, n, ksm.MADV_MERGEABLE)
            except ksm.KsmError:
                for i in range(start, start + n):
                    self.state[i] = PENDING
                raise
        return len(accepted)

    def _advise(self, first: int, npages: int, advice: int) -> None:
        ksm.madvise(self.region.mapping, self.offset + first * PAGE_SIZE,
                    npages * PAGE_SIZE, advice)

    def _poller(self) -> None:
        with self._wake:
            while not self._stop:
                waiting = PENDING in self.state
                self._wake.wait(self.poll_interval if waiting else None)
                if self._stop:
                    return
                if PENDING in self.state and self.machine.vm is not None:
                    try:
                        self._scan_locked()
                    except HvkitError:
                        time.sleep(self.poll_interval)

    # -- reporting ---------------------------------------------------------------
    def stats(self) -> DedupStats:
        with self._lock:
            pending = self.state.count(PENDING)
            marked = self.state.count(MARKED)
            return DedupStats(self.pages, pending + marked, pending, marked,
                              self.deferred, self.scans)

    def host_address(self, gpa: int) -> int:
        """Host virtual address of a window page (for KsmPageProbe)."""
        if not self.gpa <= gpa < self.gpa + self.size:
            raise ConfigError(f"{gpa:#x} is outside the mergeable window")
        return self.region.hva + (gpa - self.region.gpa)

    def marked_ranges(self) -> list[tuple[int, int]]:
        """(gpa, pages) of every run of pages marked mergeable."""
        with self._lock:
            return [(self.gpa + m.start() * PAGE_SIZE, m.end() - m.start())
                    for m in _RUNS.finditer(self.state)]

    def __enter__(self) -> "Dedup":
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()


def _runs(pages: list[int]) -> list[tuple[int, int]]:
    """Sorted page indices -> (first, count) runs of consecutive pages."""
    out: list[tuple[int, int]] = []
    for p in sorted(pages):
        if out and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out


def merge_whole_vm(machine: "MicroVM") -> int:
    """MADV_MERGEABLE on all anonymous guest RAM (QEMU's mem-merge=on):
    the baseline selective dedup is measured against. Returns bytes marked."""
    total = 0
    for region in machine.memory:
        if region.backing == "anonymous":
            ksm.madvise(region.mapping, 0, region.size, ksm.MADV_MERGEABLE)
            total += region.size
    if not total:
        raise ConfigError("no anonymous guest RAM to merge (memfd RAM never merges)")
    return total


class GuestGate(Attachment):
    """Sync points between a guest and its host driver (hypercall 0x11F0).

    The guest calls ``HC_GATE(n)``; its vCPU blocks in the handler, using
    no CPU (a spinning guest would take the cores ksmd needs), until the
    host calls ``release(n)``. ``wait(n)`` returns when the guest arrives.
    """

    def __init__(self, machine: "MicroVM", nr: int = HC_GATE) -> None:
        self.machine = machine
        self.nr = nr
        self.name = f"gate-{nr:#x}"
        self._cond = threading.Condition()
        self._arrived: set[int] = set()
        self._released: set[int] = set()
        self._closed = False
        machine.attach(self)

    def on_attach(self, vmm: "MicroVM") -> None:
        vmm.hypercalls.register(self.nr, self._handler, "gate", owner="gate")

    def on_stop(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _handler(self, call: Call) -> int:
        n = call.args[0]
        with self._cond:
            self._arrived.add(n)
            self._cond.notify_all()
            # Re-check now and then: a VM being stopped does not notify us.
            while not (n in self._released or self._closed or self.machine.stopping):
                self._cond.wait(0.1)
        return 0

    def wait(self, n: int, timeout: float = 60.0) -> None:
        with self._cond:
            ok = self._cond.wait_for(lambda: n in self._arrived
                                     or self.machine.finished.is_set(), timeout)
        if n not in self._arrived:
            out = self.machine.console_output.decode(errors="replace")[-1500:]
            why = "the guest stopped" if ok else f"timeout after {timeout} s"
            raise HvkitError(f"guest did not reach gate {n} ({why}); console:\n{out}")

    def release(self, n: int) -> None:
        with self._cond:
            self._released.add(n)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

