"""Measure what a guest sees: its TSC rate against the host's clock, and the
timer interrupts it receives, using the ``tsc`` probe guest (guests/tsc.c).

The host serves two hypercalls: HC_HOST_NS returns CLOCK_MONOTONIC in ns
(the reference the guest pairs with RDTSC), HC_TICKS_READY says the guest
is about to enable interrupts (a HostTicker starts then, so ticks owed from
before the guest could take any do not land in its measuring window).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

from hvkit.errors import HvkitError
from hvkit.machine import MicroVM
from hvkit.time.clock import ClockReport, GuestClock
from hvkit.time.ticks import HostTicker, TickStats, TimerPolicy, apply_pit_policy

HC_HOST_NS = 0x1154
HC_TICKS_READY = 0x1155
GUEST = "tsc"
#: The IRQ line a host ticker uses unless told otherwise (free on the PIC).
HOST_TICK_IRQ = 5

_KV = re.compile(r"(\w+)=(\S+)")


def _fields(output: str, tag: str) -> dict[str, str]:
    for line in output.splitlines():
        if line.startswith(tag + ":"):
            return dict(_KV.findall(line))
    raise HvkitError(f"the tsc guest printed no {tag!r} line; console:\n{output[-1500:]}")


@dataclass
class RateMeasurement:
    """The guest's TSC cycles over a host-timed window."""

    cycles: int
    host_ns: int
    cpuid_khz: int          # what the guest derives from CPUID (0: none)
    clock: ClockReport | None

    @property
    def khz(self) -> float:
        return self.cycles * 1e6 / self.host_ns

    def error_ppm(self, expected_khz: float) -> float:
        return (self.khz - expected_khz) / expected_khz * 1e6


@dataclass
class TickMeasurement:
    """Timer interrupts the guest counted over a host-timed window."""

    ticks: int
    host_ns: int
    blackout_ns: int
    during_blackout: int
    gaps: int                # times the vCPU left guest mode (TSC jumps)
    stolen_cycles: int
    guest_khz: int
    windows: list[int]
    host: TickStats | None = None
    exits: dict[str, int] = field(default_factory=dict)

    @property
    def hz(self) -> float:
        return self.ticks * 1e9 / self.host_ns

    @property
    def gaps_per_s(self) -> float:
        return self.gaps * 1e9 / self.host_ns


def _machine(args: str, **kwargs: Any) -> MicroVM:
    m = MicroVM(GUEST, memory="64M", args=args, **kwargs)
    m.hypercalls.register(HC_HOST_NS, lambda call: time.monotonic_ns(), "host-ns", owner="time")
    return m


def measure_rate(khz: int | None = None, *, ms: int = 500, exits: bool = False,
                 timeout: float = 30) -> RateMeasurement:
    """Boot the probe with the guest TSC set to ``khz`` (host rate if None)
    and measure the rate the guest's RDTSC runs at."""
    with _machine(f"mode=rate ms={ms} exits={int(exits)}") as m:
        report = GuestClock(m.vm, khz).apply() if khz is not None else None
        m.run(timeout=timeout)
        out = m.console_output.decode(errors="replace")
    rate, cpuid = _fields(out, "rate"), _fields(out, "cpuid")
    return RateMeasurement(int(rate["cycles"]), int(rate["host_ns"]), int(cpuid["khz"]), report)


def measure_ticks(source: str = "host", *, policy: TimerPolicy | None = None,
                  khz: int | None = None, ms: int = 2000, blackout_ms: int = 0,
                  settle_ms: int = 200, win_ms: int = 250, irq: int = HOST_TICK_IRQ,
                  timeout: float = 60) -> TickMeasurement:
    """Boot the probe with a timer at ``policy.hz`` from the in-kernel PIT
    (``source="pit"``) or a HostTicker (``"host"``), or none (``"none"``, the
    baseline for the guest's count of exits), optionally with a
    no-exit section of ``blackout_ms``, and count what the guest receives."""
    if source not in ("pit", "host", "none"):
        raise HvkitError(f"timer source must be 'pit', 'host' or 'none', got {source!r}")
    policy = policy or TimerPolicy()
    hz = policy.hz
    if source == "pit" and hz != int(hz):
        raise HvkitError(f"the PIT is programmed in whole Hz; got {hz}")
    args = (f"mode=ticks src={source} hz={int(hz)} irq={irq} ms={ms} "
            f"blackout_ms={blackout_ms} settle_ms={settle_ms} win_ms={win_ms}")
    ticker: HostTicker | None = None
    with _machine(args) as m:
        plan = GuestClock(m.vm, khz).apply().plan if khz is not None else None
        if source == "pit":
            apply_pit_policy(m.vm, policy)
        elif source == "host":
            ticker = HostTicker(m.vm, irq, policy, plan)

        def ready(call: Any) -> int:
            if ticker is not None:
                ticker.start()
            return 0

        m.hypercalls.register(HC_TICKS_READY, ready, "ticks-ready", owner="time")
        try:
            m.run(timeout=timeout)
        finally:
            stats = ticker.stop() if ticker is not None else None
        out = m.console_output.decode(errors="replace")
        exits = m.exit_counts()
    f = _fields(out, "ticks")
    win = next((line.split()[1:] for line in out.splitlines() if line.startswith("win:")), [])
    return TickMeasurement(int(f["n"]), int(f["ns"]), int(f["blackout_ns"]),
                           int(f["during_blackout"]), int(f["gaps"]), int(f["stolen"]),
                           int(f["khz"]), [int(w) for w in win], stats, exits)
