"""Selective dedup end to end: four microVMs whose guests nominate 32 MiB of
pages (identical across the VMs) and keep 32 MiB more (also identical)
to themselves. KSM must merge the nominated pages and nothing else, and a
guest write to a merged page must stay in that guest."""
from __future__ import annotations

import os
import re
import struct
import time

import pytest

from hvkit.memory import ksm
from hvkit.memory.dedup import Dedup, GuestGate

MiB = 1 << 20
PAGE = 4096
PAGES = 32 * MiB // PAGE
PRIV_BASE = 8 * MiB          # guests/dedup.c: the heap's private pages
SEED = 7
COW_PAGES = 16
DISABLE_PAGES = 8
M64 = (1 << 64) - 1


def page_word(seed: int, set_: int, page: int, j: int) -> int:
    """guests/dedup.c page_word(): the content of every heap page."""
    h = ((seed * 1000003 + set_ * 0x100000000 + page + 1) * 0x9E3779B97F4A7C15) & M64
    return h ^ (((j + 1) * 0xBF58476D1CE4E5B9) & M64)


def page_bytes(set_: int, page: int) -> bytes:
    return struct.pack("<512Q", *(page_word(SEED, set_, page, j) for j in range(512)))


def ksm_ready() -> None:
    st = ksm.ksm_status()
    if not st.usable:
        pytest.skip(f"KSM unusable here: {st.reason}")
    if os.geteuid() != 0:
        pytest.skip("per-page KSM checks read /proc/kpageflags, which needs root")


def wait_merged(probe: ksm.KsmPageProbe, dds: list[Dedup], want: float,
                timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        counts = [probe.count(dd.host_address(dd.gpa), PAGES) for dd in dds]
        if min(counts) >= want * PAGES or time.monotonic() > deadline:
            return counts
        time.sleep(0.1)


@pytest.mark.kvm
def test_four_vms_merge_exactly_the_nominated_pages(microvm):
    ksm_ready()
    before = ksm.read_stats()
    with ksm.KsmTuning(pages_to_scan=10000, sleep_millisecs=0), ksm.KsmPageProbe() as probe:
        vms, dds, gates = [], [], []
        for i in range(4):
            cow = COW_PAGES if i == 0 else 0
            disable = DISABLE_PAGES if i == 1 else 0
            vm = microvm("dedup", memory="112M", memory_backing="anonymous",
                         args=f"mode=dedup pages={PAGES} others={PAGES} seed={SEED} "
                              f"cow={cow} disable={disable}")
            dds.append(Dedup(vm, window_size=32 * MiB).attach())
            gates.append(GuestGate(vm))
            vms.append(vm)
        for vm in vms:
            vm.start()
        for gate in gates:
            gate.wait(1, timeout=60)
        for vm, dd in zip(vms, dds):
            assert b"bad 0" in vm.console_output, vm.console_output
            st = dd.stats()
            assert (st.nominated, st.marked, st.pending) == (PAGES, PAGES, 0)
            assert dd.marked_ranges() == [(dd.gpa, PAGES)]

        t0 = time.monotonic()
        counts = wait_merged(probe, dds, 0.95, timeout=40)
        merge_time = time.monotonic() - t0
        assert min(counts) >= 0.95 * PAGES, f"merged per VM {counts} of {PAGES} in {merge_time:.1f} s"

        # Nothing outside the windows merged: not the other 32 MiB, not the
        # stale private copies of the nominated pages, not the guest image.
        for vm, dd in zip(vms, dds):
            region = dd.region
            below = (dd.gpa - region.gpa) // PAGE
            flags = probe.ksm_pages(region.hva, below)
            assert sum(flags) == 0, f"{sum(flags)} pages outside the window merged"
            others = probe.ksm_pages(region.hva + PRIV_BASE + PAGES * PAGE, PAGES)
            assert not any(others)
        # The same frames back the nominated pages of all four VMs.
        shared = ksm.shared_pfns(probe, [(dd.host_address(dd.gpa), PAGES) for dd in dds])
        assert len(shared) >= 0.95 * PAGES
        # KSM's host-wide counter lags its per-page state and also moves
        # with other processes' pages (earlier VMs going away): give it time.
        deadline = time.monotonic() + 30
        while True:
            gained = ksm.read_stats().pages_sharing - before.pages_sharing
            if gained >= 3 * 0.95 * PAGES or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert gained >= 3 * 0.95 * PAGES

        # VM 0 writes its first pages; its copy-on-write copies are its own.
        gates[0].release(1)
        gates[0].wait(2, timeout=30)
        out0 = vms[0].console_output.decode()
        m = re.search(r"wrote (\d+) merged pages: cow_cycles (\d+) plain_cycles (\d+) "
                      r"readback_bad (\d+) bad (\d+)", out0)
        assert m and m.group(1) == str(COW_PAGES) and m.group(4) == "0" and m.group(5) == "0", out0
        mem0, win0 = vms[0].memory, dds[0].gpa
        for k in range(COW_PAGES):
            data = mem0.read(win0 + k * PAGE, PAGE)
            assert struct.unpack_from("<Q", data, 8)[0] == 0x5157C0DE + k
        assert not any(probe.ksm_pages(dds[0].host_address(win0), COW_PAGES))
        for vm, dd in zip(vms[1:], dds[1:]):
            for k in range(COW_PAGES):
                assert vm.memory.read(dd.gpa + k * PAGE, PAGE) == page_bytes(1, k)
            assert sum(probe.ksm_pages(dd.host_address(dd.gpa), COW_PAGES)) >= COW_PAGES - 1

        # VM 1 disables dedup for its last pages: they are unmerged at once.
        gates[1].release(1)
        gates[1].release(2)
        gates[1].wait(3, timeout=30)
        dd1 = dds[1]
        last = dd1.gpa + (PAGES - DISABLE_PAGES) * PAGE
        assert dd1.stats().marked == PAGES - DISABLE_PAGES
        assert not any(probe.ksm_pages(dd1.host_address(last), DISABLE_PAGES))
        assert b"disabled 8 pages, bad 0" in vms[1].console_output

        for gate in gates:
            for n in (1, 2, 3):
                gate.release(n)
        for vm in vms:
            assert vm.wait(30) == 0, vm.console_output.decode()
        for dd in dds:
            dd.detach()
    # KsmTuning put the host's values back.
    restored = ksm.read_stats()
    assert (restored.run, restored.pages_to_scan, restored.sleep_millisecs) == \
        (before.run, before.pages_to_scan, before.sleep_millisecs)
