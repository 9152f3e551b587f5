#!/usr/bin/env python3
"""Guest time on this host: what KVM can do for the guest TSC, what the
guest measures, and how the timer policy keeps its tick clock whole across
a section that takes no exits.

1. Probe the host (TSC rate, hardware scaling) and plan three requests:
   the host rate, 15% faster, 20% slower (refused without scaling, with
   the host rate in the error).
2. Boot the tsc guest with the faster rate: it reads the rate from CPUID
   and measures its RDTSC against the host's clock.
3. Boot it with a 100 Hz host-driven timer under the catch-up and discard
   policies, with 500 ms of interrupts off, and print the ticks per 250 ms
   window: catch-up pays back the lost ticks at up to 4x, discard does not.
"""
import warnings

from hvkit.machine import MicroVM
from hvkit.time.clock import HostTscSupport
from hvkit.time.probe import measure_rate, measure_ticks
from hvkit.time.ticks import TimerPolicy
from hvkit.time.tsc import TscError, plan

with MicroVM("tsc", memory="16M") as m:
    support = HostTscSupport.probe(m.vm)
print(support.describe())
host = support.host_khz
for req in (host, host * 115 // 100, host * 80 // 100):
    try:
        print(" ", plan(req, host, hardware_scaling=support.hardware_scaling,
                        fmt=support.fmt).describe())
    except TscError as exc:
        print("  refused:", exc)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")     # the catch-up warning is printed by describe() above
    r = measure_rate(host * 115 // 100)
print(f"guest told {r.cpuid_khz} kHz by CPUID; its RDTSC runs at {r.khz:.0f} kHz "
      f"({r.error_ppm(host):+.0f} ppm from the host rate, "
      f"{r.error_ppm(r.cpuid_khz):+.0f} ppm from the request)")

for lost in ("catchup", "discard"):
    t = measure_ticks("host", policy=TimerPolicy(hz=100, lost_ticks=lost), blackout_ms=500)
    print(f"{lost:8s} {t.ticks} ticks in {t.host_ns / 1e9:.2f} s ({t.hz:.1f}/s of 100), "
          f"none during {t.blackout_ns / 1e6:.0f} ms with interrupts off; "
          f"per 250 ms: {t.windows}; host: {t.host.coalesced} coalesced, "
          f"{t.host.catchup} delivered catching up, {t.host.dropped} dropped")
