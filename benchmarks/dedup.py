"""Selective dedup against whole-VM merging, 8 microVMs x 64 MiB by default.

Each guest (guests/dedup.c) fills N MiB of pages it nominates for dedup
and N MiB it keeps to itself, with contents identical across the VMs.

* selective/tuned, selective/default: hvkit's Dedup; KSM at
  pages_to_scan=10000, sleep_millisecs=0, then at the kernel defaults
  (100, 20 ms).
* whole-vm/tuned (the baseline, from the same run): the same guests without
  dedup calls and MADV_MERGEABLE on all guest RAM, as QEMU's mem-merge=on.

Per scenario: time from KSM start until 50% and 100% of the nominated
pages sit on one frame in all VMs (pagemap), what KSM scanned
(pages_scanned, full_scans) until then and until the merge settled, bytes
saved (pages_sharing, general_profit, the process's PSS), the nominated and
other pages seen as KSM pages page by page (kpageflags), and for the
selective runs the guest's cost of a write to a merged page (the
copy-on-write break) against a write to a private page. JSON on stdout.

    python benchmarks/dedup.py [--vms 8] [--mib 64] [--default-timeout 240]
    python benchmarks/dedup.py --quick     # 2 VMs x 2 MiB, tuned KSM only: a smoke run

Needs root (KSM knobs, /proc/kpageflags). KSM values are restored after.
Runs against the installed hvkit (pip install .).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time

from hvkit.host import probe as host_probe
from hvkit.machine import MicroVM
from hvkit.memory import ksm
from hvkit.memory.dedup import Dedup, GuestGate, merge_whole_vm

MiB = 1 << 20
PAGE = 4096
PRIV_BASE = 8 * MiB
TUNED = {"pages_to_scan": 10000, "sleep_millisecs": 0}
DEFAULT = {"pages_to_scan": 100, "sleep_millisecs": 20}


def smaps_rollup() -> dict[str, int]:
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            m = re.match(r"(\w+):\s+(\d+) kB", line)
            if m:
                out[m.group(1)] = int(m.group(2)) * 1024
    return out


def merged_everywhere(probe: ksm.KsmPageProbe, ranges: list[tuple[int, int]]) -> int:
    """Nominated page indices whose copies in every VM sit on one frame:
    merged across all VMs (pagemap alone, cheap enough to poll)."""
    cols = [probe.pfns(addr, n) for addr, n in ranges]
    return sum(1 for frames in zip(*cols) if frames[0] and frames.count(frames[0]) == len(frames))


def settle_ksm() -> None:
    """Let ksmd drop what earlier VMs left (their counters fall only when
    ksmd next passes), so this scenario's deltas are its own. (The wait
    holds a page of its own mergeable, so ksmd scans even when nothing else
    on the host is: on a fresh machine there is nothing else.)"""
    with ksm.KsmTuning(**TUNED):
        ksm.wait_full_scans(2, timeout=60)


def scenario(name: str, vms_n: int, mib: int, selective: bool, tuning: dict,
             timeout: float, tsc_khz: int) -> dict:
    pages = mib * MiB // PAGE
    settle_ksm()
    ram = PRIV_BASE + 2 * mib * MiB + (mib * MiB if selective else 0) + 8 * MiB
    mode = "dedup" if selective else "plain"
    vms, dds, gates = [], [], []
    try:
        for _ in range(vms_n):
            vm = MicroVM("dedup", memory=ram, memory_backing="anonymous",
                         args=f"mode={mode} pages={pages} others={pages} seed=3 cow=32")
            vms.append(vm)
            if selective:
                dds.append(Dedup(vm, window_size=mib * MiB).attach())
            gates.append(GuestGate(vm))
        t_boot = time.monotonic()
        for vm in vms:
            vm.start()
        for g in gates:
            g.wait(1, timeout=300)
        guests_ready = time.monotonic() - t_boot
        if not selective:
            for vm in vms:
                merge_whole_vm(vm)
        if selective:
            ranges = [(d.host_address(d.gpa), pages) for d in dds]
        else:
            ranges = [(vm.memory.regions[0].hva + PRIV_BASE, pages) for vm in vms]
        pfn_probe = ksm.KsmPageProbe()
        before = ksm.read_stats()
        pss0 = smaps_rollup()
        t50 = t100 = None
        scanned_at_100 = scans_at_100 = None
        settled = False
        with ksm.KsmTuning(**tuning):
            t0 = time.monotonic()
            last_sharing, last_change_scans = -1, 0
            while True:
                st = ksm.read_stats()
                now = time.monotonic() - t0
                sharing = st.pages_sharing - before.pages_sharing
                scans = st.full_scans - before.full_scans
                done = merged_everywhere(pfn_probe, ranges)
                if t50 is None and done >= pages / 2:
                    t50 = now
                if t100 is None and done >= pages:
                    t100 = now
                    scanned_at_100 = st.pages_scanned - before.pages_scanned
                    scans_at_100 = scans
                if sharing != last_sharing:
                    last_sharing, last_change_scans = sharing, scans
                elif scans >= last_change_scans + 2 and (t100 is not None or not selective):
                    settled = True       # two full scans without a change
                    break
                if now > timeout:
                    break
                time.sleep(0.05)
            end = ksm.read_stats()
            merged_at_end = merged_everywhere(pfn_probe, ranges)
            pfn_probe.close()
            elapsed = time.monotonic() - t0
            with ksm.KsmPageProbe() as probe:
                nominated = other = 0
                for i, vm in enumerate(vms):
                    region = vm.memory.regions[0]
                    if selective:
                        nominated += probe.count(dds[i].host_address(dds[i].gpa), pages)
                    else:
                        nominated += probe.count(region.hva + PRIV_BASE, pages)
                    other += probe.count(region.hva + PRIV_BASE + pages * PAGE, pages)
            pss1 = smaps_rollup()
            cow = []
            if selective:
                for g in gates:
                    g.release(1)
                for g, vm in zip(gates, vms):
                    g.wait(2, timeout=60)
                    m = re.search(rb"cow_cycles (\d+) plain_cycles (\d+)", vm.console_output)
                    if m:
                        cow.append((int(m.group(1)), int(m.group(2))))
        for g in gates:
            for n in (1, 2, 3):
                g.release(n)
        for vm in vms:
            vm.wait(60)
        to_us = (lambda c: round(c / tsc_khz * 1000, 2)) if tsc_khz else (lambda c: None)
        result = {
            "scenario": name,
            "ksm": tuning,
            "vms": vms_n,
            "nominated_mib_per_vm": mib,
            "other_mib_per_vm": mib,
            "guests_ready_s": round(guests_ready, 2),
            "time_to_50pct_s": None if t50 is None else round(t50, 2),
            "time_to_100pct_s": None if t100 is None else round(t100, 2),
            "pages_scanned_to_100pct": scanned_at_100,
            "full_scans_to_100pct": scans_at_100,
            "settled": settled,
            "nominated_pages_on_one_frame_pct": round(100 * merged_at_end / pages, 2),
            "observed_s": round(elapsed, 2),
            "pages_scanned_total": end.pages_scanned - before.pages_scanned,
            "full_scans_total": end.full_scans - before.full_scans,
            "pages_sharing": end.pages_sharing - before.pages_sharing,
            "pages_shared": end.pages_shared - before.pages_shared,
            "saved_mib": round((end.pages_sharing - before.pages_sharing) * PAGE / MiB, 1),
            "general_profit_mib": None if end.general_profit is None else
            round((end.general_profit - (before.general_profit or 0)) / MiB, 1),
            "pss_drop_mib": round((pss0.get("Pss", 0) - pss1.get("Pss", 0)) / MiB, 1),
            "rss_mib": round(pss1.get("Rss", 0) / MiB, 1),
            "nominated_pages_merged_pct": round(100 * nominated / (vms_n * pages), 2),
            "other_pages_merged_pct": round(100 * other / (vms_n * pages), 2),
        }
        if cow:
            c = statistics.median(x for x, _ in cow)
            p = statistics.median(y for _, y in cow)
            result.update(cow_write_cycles=c, cow_write_us=to_us(c),
                          private_write_cycles=p, private_write_us=to_us(p))
        return result
    finally:
        for g in gates:
            g.close()
        for dd in dds:
            dd.detach(unmerge=False)
        for vm in vms:
            vm.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vms", type=int, default=8)
    ap.add_argument("--mib", type=int, default=64, help="nominated MiB per VM (and as many others)")
    ap.add_argument("--tuned-timeout", type=float, default=60)
    ap.add_argument("--default-timeout", type=float, default=300)
    ap.add_argument("--skip-default", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help="2 VMs x 2 MiB, tuned KSM only (a smoke run, not a measurement)")
    args = ap.parse_args()
    if args.quick:
        args.vms, args.mib, args.skip_default = 2, 2, True
        args.tuned_timeout = min(args.tuned_timeout, 30)
    status = ksm.ksm_status()
    if not status.usable:
        sys.exit(f"KSM is not usable: {status.reason}")
    tsc_khz = host_probe().tsc_khz
    runs = [scenario("selective", args.vms, args.mib, True, TUNED, args.tuned_timeout, tsc_khz),
            scenario("whole-vm", args.vms, args.mib, False, TUNED, args.tuned_timeout, tsc_khz)]
    if not args.skip_default:
        runs.append(scenario("selective", args.vms, args.mib, True, DEFAULT,
                             args.default_timeout, tsc_khz))
    print(json.dumps({"benchmark": "dedup", "tsc_khz": tsc_khz, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
