#!/usr/bin/env python3
"""Two microVMs deduplicate the pages their guests choose, and nothing else.

Each `dedup` guest fills 16 MiB it nominates and 16 MiB it keeps private
(the same contents in both VMs). Its small OS moves the nominated pages
into the mergeable window the host offers and names them by hypercall;
Dedup marks exactly those host pages MADV_MERGEABLE once the guest has
written them (seen through the window's dirty log). KSM runs flat out for
the demo and gets its previous settings back afterwards. Needs root.
"""
import time

from hvkit.machine import MicroVM
from hvkit.memory import ksm
from hvkit.memory.dedup import Dedup, GuestGate

MiB = 1 << 20
PAGES = 16 * MiB // 4096

status = ksm.ksm_status()
if not status.usable:
    raise SystemExit(f"KSM is not usable here: {status.reason}")

vms, dedups, gates = [], [], []
for _ in range(2):
    # KSM merges only private anonymous memory: not memfd RAM.
    vm = MicroVM("dedup", memory="64M", memory_backing="anonymous",
                 args=f"mode=dedup pages={PAGES} others={PAGES} cow=4")
    dedups.append(Dedup(vm, window_size=16 * MiB).attach())
    gates.append(GuestGate(vm))   # the guest waits here without using CPU
    vms.append(vm)
for vm in vms:
    vm.start()
for gate in gates:
    gate.wait(1)

with ksm.KsmTuning(pages_to_scan=10000, sleep_millisecs=0), ksm.KsmPageProbe() as probe:
    t0 = time.monotonic()
    while True:
        merged = [probe.count(d.host_address(d.gpa), PAGES) for d in dedups]
        if min(merged) == PAGES or time.monotonic() - t0 > 20:
            break
        time.sleep(0.05)
    print(f"merged {merged} of {PAGES} nominated pages per VM "
          f"in {time.monotonic() - t0:.2f} s")
    print(f"KSM: {ksm.read_stats().pages_sharing} pages sharing, "
          f"this process: {ksm.process_stat()}")
    for gate in gates:            # guests now write to merged pages
        gate.release(1)
        gate.wait(2)
        gate.release(2)

for vm, d in zip(vms, dedups):
    print(f"exit {vm.wait(30)}; {d.stats()}")
    print(vm.console_output.decode(), end="")
    d.detach()
    vm.close()
