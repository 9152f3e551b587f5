#!/usr/bin/env python3
"""Guest time accuracy and the cost of the timer heuristics, as the guest sees them.

Three measurements, each repeated (default 3) with the median and range:

  tsc_rate  the guest's RDTSC rate against the host's CLOCK_MONOTONIC (the
            tsc guest pairs each reference hypercall with the midpoint of two
            RDTSCs) for: no GuestClock (baseline: the raw host rate), a
            request inside KVM's 250 ppm window, and one 15% above the host
            (catch-up without hardware scaling; quiet and with an exit every
            100 us). Errors are against the requested rate and the host rate.
  ticks     timer interrupts per second the guest counts against the
            configured rate: in-kernel PIT and hvkit's host ticker, 100 and
            1000 Hz; and both lost-tick policies over a 500 ms no-exit section.
  cost      what the heuristics cost: times per second the guest's vCPU left
            guest mode (TSC jumps over 2 us, counted in the guest), the share
            of guest time lost to them, and the host ticker's ioctls per second;
            the baseline is the same guest with no timer at all, in the same run.

Prints one JSON object. Needs /dev/kvm.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import warnings
from typing import Any, Callable

from hvkit.machine import MicroVM
from hvkit.time.clock import HostTscSupport
from hvkit.time.probe import TickMeasurement, measure_rate, measure_ticks
from hvkit.time.ticks import TimerPolicy
from hvkit.time.tsc import tolerance_bounds


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def repeat(n: int, fn: Callable[[], Any]) -> list[Any]:
    return [fn() for _ in range(n)]


def rate_case(name: str, req: int | None, host_khz: int, reps: int, ms: int,
              exits: bool = False) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs = repeat(reps, lambda: measure_rate(req, ms=ms, exits=exits))
    khz = [r.khz for r in runs]
    out: dict[str, Any] = {"case": name, "requested_khz": req, "exits": exits,
                           "measured_khz": summary(khz),
                           "error_vs_host_ppm": summary([(k - host_khz) / host_khz * 1e6
                                                         for k in khz])}
    if req is not None:
        out["error_vs_requested_ppm"] = summary([(k - req) / req * 1e6 for k in khz])
        out["mode"] = runs[0].clock.plan.mode.value if runs[0].clock else None
        out["guest_cpuid_khz"] = runs[0].cpuid_khz
    return out


def tick_case(name: str, source: str, policy: TimerPolicy, reps: int, ms: int,
              blackout_ms: int = 0) -> tuple[dict[str, Any], list[TickMeasurement]]:
    runs = repeat(reps, lambda: measure_ticks(source, policy=policy, ms=ms,
                                              blackout_ms=blackout_ms))
    out: dict[str, Any] = {"case": name, "source": source, "configured_hz": policy.hz,
                           "lost_ticks": policy.lost_ticks.value,
                           "pit_reinject": policy.pit_reinject, "blackout_ms": blackout_ms}
    if source != "none":
        out["measured_hz"] = summary([r.hz for r in runs])
        out["error_vs_configured_pct"] = summary([(r.hz / policy.hz - 1) * 100 for r in runs])
        if blackout_ms:
            expected_lost = [policy.hz * r.blackout_ns / 1e9 for r in runs]
            out["ticks_lost"] = summary([policy.hz * r.host_ns / 1e9 - r.ticks for r in runs])
            out["ticks_in_no_exit_section"] = statistics.median(expected_lost)
    out["guest_exits_per_s"] = summary([r.gaps_per_s for r in runs])
    out["guest_time_lost_pct"] = summary([r.stolen_cycles / (r.guest_khz * r.host_ns / 1e6) * 100
                                          for r in runs])
    hosts = [r.host for r in runs if r.host is not None]
    if hosts:
        out["host_ioctls_per_s"] = summary([h.ioctls_per_s for h in hosts])
        out["host_catchup_ticks"] = summary([float(h.catchup) for h in hosts])
    return out, runs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ms", type=int, default=2000, help="tick window per run")
    ap.add_argument("--rate-ms", type=int, default=500, help="TSC rate window per run")
    a = ap.parse_args()

    with MicroVM("tsc", memory="16M") as m:
        support = HostTscSupport.probe(m.vm)
    host = support.host_khz
    _, hi = tolerance_bounds(host)
    above = host * 115 // 100

    rates = [
        rate_case("baseline: no GuestClock (raw host TSC)", None, host, a.reps, a.rate_ms),
        rate_case("within tolerance (+250 ppm)", hi, host, a.reps, a.rate_ms),
        rate_case("15% above host, quiet", above, host, a.reps, a.rate_ms),
        rate_case("15% above host, exit every 100 us", above, host, a.reps, a.rate_ms,
                  exits=True),
    ]
    if support.hardware_scaling:
        rates.append(rate_case("80% of host, hardware scaling", host * 80 // 100, host,
                               a.reps, a.rate_ms))

    cases = [
        ("baseline: no timer", "none", TimerPolicy(), 0),
        ("PIT 100 Hz", "pit", TimerPolicy(hz=100), 0),
        ("PIT 1000 Hz", "pit", TimerPolicy(hz=1000), 0),
        ("host ticker 100 Hz", "host", TimerPolicy(hz=100), 0),
        ("host ticker 1000 Hz", "host", TimerPolicy(hz=1000), 0),
        ("host ticker 100 Hz, catch-up over 500 ms no-exit", "host",
         TimerPolicy(hz=100, lost_ticks="catchup"), 500),
        ("host ticker 100 Hz, discard over 500 ms no-exit", "host",
         TimerPolicy(hz=100, lost_ticks="discard"), 500),
        ("PIT 100 Hz, KVM reinject over 500 ms no-exit", "pit", TimerPolicy(hz=100), 500),
        ("PIT 100 Hz, no reinject over 500 ms no-exit", "pit",
         TimerPolicy(hz=100, pit_reinject=False), 500),
    ]
    ticks = []
    for name, src, pol, bo in cases:
        out, _ = tick_case(name, src, pol, a.reps, a.ms, bo)
        ticks.append(out)
    base = ticks[0]["guest_exits_per_s"]["median"]
    for t in ticks[1:]:
        t["extra_exits_per_s_over_baseline"] = t["guest_exits_per_s"]["median"] - base

    result = {
        "benchmark": "time",
        "host": {"kernel": platform.release(), "tsc_khz": host,
                 "hardware_scaling": support.hardware_scaling,
                 "vm_scoped_tsc_khz": support.vm_scoped, "ratio_format": str(support.fmt),
                 "invariant_tsc": support.invariant_tsc},
        "reps": a.reps, "tick_window_ms": a.ms, "rate_window_ms": a.rate_ms,
        "tsc_rate": rates,
        "ticks": ticks,
        "baseline": {"tsc_rate_khz": rates[0]["measured_khz"]["median"],
                     "guest_exits_per_s_without_timer": base},
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
