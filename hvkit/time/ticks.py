"""Timer-interrupt policy: keep a guest's tick-based clock coherent when it
misses ticks (code that takes no exits, interrupts off, a descheduled
vCPU) or when its TSC does not run at the rate it was told.

Two sources are covered:

* the in-kernel PIT, whose only knob is KVM's own reinjection
  (KVM_REINJECT_CONTROL): on, KVM queues the ticks the guest did not
  acknowledge and delivers each as soon as the previous one is taken;
  off, they are lost;
* :class:`HostTicker`, a system timer driven from the VMM on an IRQ line,
  where hvkit applies :class:`TimerPolicy` itself: it sees a missed tick
  as a coalesced interrupt (KVM_IRQ_LINE_STATUS returns 0 while the
  previous one is still pending) and, under ``catchup``, delivers the
  backlog at up to ``catchup_factor`` times the nominal rate once the guest
  takes interrupts again.

The rate itself comes from :meth:`TimerPolicy.decide`, a pure function of
the policy, the TSC plan and the backlog, so what the heuristics do is
explicit and testable without a VM.
"""
from __future__ import annotations

import enum
import struct
import threading
import time
from dataclasses import dataclass, field
from fractions import Fraction

from hvkit import _native
from hvkit.errors import ConfigError
from hvkit.kvm.vm import Vm
from hvkit.vmm.attach import Attachment
from hvkit.time.tsc import TscPlan

#: KVM_REINJECT_CONTROL = _IO(KVMIO, 0x71); the argument is struct kvm_reinject_control.
KVM_REINJECT_CONTROL = 0xAE71
_REINJECT = struct.Struct("<B31x")
_IRQ_LEVEL = struct.Struct("<iI")


class LostTicks(enum.Enum):
    """What to do with a tick the guest could not take."""

    CATCHUP = "catchup"    # owe it; deliver the backlog faster than nominal later
    DISCARD = "discard"    # forget it: the guest's tick clock falls behind


@dataclass(frozen=True)
class RateDecision:
    """The tick rate the policy wants now, and why."""

    hz: float
    nominal_hz: float
    factors: dict[str, float] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        """The product of the active heuristics' factors."""
        return self.hz / self.nominal_hz


@dataclass(frozen=True)
class TimerPolicy:
    """The time-virtualization heuristics, explicit.

    hz              the guest's configured system-timer rate
    lost_ticks      catchup or discard (see LostTicks)
    catchup_factor  at most this multiple of the rate while ticks are owed
    max_backlog_s   owe at most this much time; older debt is dropped (a
                    guest paused for an hour should not get an hour of ticks)
    follow_tsc      scale the tick rate by the guest TSC's effective rate over
                    the rate it was told (CPUID), so that the guest's TSC time
                    and tick time agree even where the TSC cannot be scaled
    pit_reinject    KVM's in-kernel PIT reinjection of missed ticks
    """

    hz: float = 100.0
    lost_ticks: LostTicks = LostTicks.CATCHUP
    catchup_factor: float = 4.0
    max_backlog_s: float = 2.0
    follow_tsc: bool = True
    pit_reinject: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.lost_ticks, LostTicks):
            try:
                object.__setattr__(self, "lost_ticks", LostTicks(self.lost_ticks))
            except ValueError:
                raise ConfigError(f"lost_ticks must be one of "
                                  f"{[m.value for m in LostTicks]}, got {self.lost_ticks!r}") from None
        if not 0 < self.hz <= 10_000:
            raise ConfigError(f"timer rate {self.hz} Hz is outside 0..10000 Hz")
        if not 1.0 <= self.catchup_factor <= 100.0:
            raise ConfigError(f"catchup_factor {self.catchup_factor} is outside 1..100 "
                              "(1 means no acceleration)")
        if self.max_backlog_s < 0:
            raise ConfigError(f"max_backlog_s {self.max_backlog_s} is negative")

    def tsc_factor(self, tsc: TscPlan | None) -> float:
        """Effective over declared TSC rate (1 when not following the TSC)."""
        if not self.follow_tsc or tsc is None:
            return 1.0
        return float(tsc.effective_khz / Fraction(tsc.requested_khz))

    def base_hz(self, tsc: TscPlan | None = None) -> float:
        """The tick rate with no backlog: nominal, scaled to the guest's TSC."""
        return self.hz * self.tsc_factor(tsc)

    def max_backlog(self, tsc: TscPlan | None = None) -> int:
        """The most ticks the policy will owe."""
        if self.lost_ticks is LostTicks.DISCARD:
            return 0
        return int(self.max_backlog_s * self.base_hz(tsc))

    def decide(self, tsc: TscPlan | None = None, owed: int = 0) -> RateDecision:
        """The rate to deliver at, given the guest's TSC plan and how many
        ticks are owed beyond the one now due."""
        factors: dict[str, float] = {}
        hz = self.hz
        tf = self.tsc_factor(tsc)
        if tf != 1.0:
            factors["tsc"] = tf
            hz *= tf
        if owed > 0 and self.lost_ticks is LostTicks.CATCHUP and self.catchup_factor > 1:
            factors["catchup"] = self.catchup_factor
            hz *= self.catchup_factor
        return RateDecision(hz, self.hz, factors)


def set_pit_reinject(vm: Vm, reinject: bool) -> None:
    """KVM_REINJECT_CONTROL: whether the in-kernel PIT re-delivers missed ticks."""
    buf = bytearray(_REINJECT.pack(1 if reinject else 0))
    _native.ioctl_buf(vm.fd, KVM_REINJECT_CONTROL, buf, f"KVM_REINJECT_CONTROL({int(reinject)})")


def irq_line_status(vm: Vm, irq: int, level: bool) -> int:
    """KVM_IRQ_LINE_STATUS: >0 delivered, 0 coalesced with a pending one, <0 masked."""
    buf = bytearray(_IRQ_LEVEL.pack(irq, 1 if level else 0))
    _native.ioctl_buf(vm.fd, _native.IOCTLS["IRQ_LINE_STATUS"], buf,
                      f"KVM_IRQ_LINE_STATUS({irq}, {int(level)})")
    return _IRQ_LEVEL.unpack_from(buf)[0]


@dataclass
class TickStats:
    """What the ticker did; ``owed`` is the backlog at the time of reading."""

    due: int = 0            # ticks the guest should have had by now
    attempts: int = 0       # edges raised
    delivered: int = 0      # accepted by the interrupt controller
    coalesced: int = 0      # raised while the previous tick was still pending
    masked: int = 0         # raised while the guest had the line masked
    dropped: int = 0        # forgiven (discard policy, masked line, backlog cap)
    catchup: int = 0        # delivered faster than nominal to pay back a backlog
    max_owed: int = 0
    owed: int = 0
    elapsed_s: float = 0.0
    base_hz: float = 0.0

    @property
    def ioctls_per_s(self) -> float:
        """The heuristics' host cost: two KVM_IRQ_LINE_STATUS calls an attempt."""
        return 2 * self.attempts / self.elapsed_s if self.elapsed_s else 0.0


class HostTicker(Attachment):
    """A system timer the VMM drives on an IRQ line, under a TimerPolicy.

    Attached to a VM (``vmm.attach(HostTicker(vmm.vm, irq, policy))``) it
    starts with the vCPUs and stops with them; alone, ``start``/``stop``.

    The schedule is absolute: the n-th tick is due at start + n / base_hz,
    so host scheduling jitter does not accumulate. A tick is attempted when
    due; if the interrupt controller still holds the previous one (the guest
    has interrupts off), the tick is owed (catchup) or dropped (discard).
    While owing, ticks go out at up to catchup_factor times the rate; after
    two coalesced attempts in a row the ticker falls back to the nominal
    period, so a guest with interrupts off is not hammered.
    """

    def __init__(self, vm: Vm, irq: int, policy: TimerPolicy, tsc: TscPlan | None = None) -> None:
        if not 0 <= irq < 24 or irq in (0, 2):
            raise ConfigError(f"IRQ {irq} cannot carry a host tick: use 1 or 3..23 "
                              "(0 is the PIT's, 2 the PIC cascade)")
        self.vm = vm
        self.irq = irq
        self.policy = policy
        self.tsc = tsc
        self.base_hz = policy.base_hz(tsc)
        self.cap = policy.max_backlog(tsc)
        self._stats = TickStats(base_hz=self.base_hz)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self.name = f"ticker-irq{irq}"

    def on_start(self) -> None:
        if self._thread is None:
            self.start()

    def on_stop(self) -> None:
        self.stop()

    def close(self) -> None:
        self.stop()

    def state(self) -> dict:
        return {"irq": self.irq, "base_hz": self.base_hz}

    def start(self) -> "HostTicker":
        if self._thread is not None:
            raise ConfigError("this ticker was already started")
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name=f"hvkit-tick-irq{self.irq}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> TickStats:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        return self.stats()

    def stats(self) -> TickStats:
        with self._lock:
            s = TickStats(**self._stats.__dict__)
        if self._t0:
            s.elapsed_s = time.monotonic() - self._t0
        return s

    def _fire(self) -> int:
        status = irq_line_status(self.vm, self.irq, True)
        irq_line_status(self.vm, self.irq, False)
        return status

    def _loop(self) -> None:
        period = 1.0 / self.base_hz
        fast = period / self.policy.catchup_factor
        last = -1.0            # when the last attempt was made
        misses = 0             # coalesced or masked attempts in a row
        st = self._stats
        while not self._stop.is_set():
            now = time.monotonic() - self._t0
            due = int(now * self.base_hz) + 1      # tick 0 goes out at once
            with self._lock:
                st.due = due
                owed = due - st.delivered - st.dropped
                if owed > self.cap + 1:
                    st.dropped += owed - self.cap - 1
                    owed = self.cap + 1
                st.owed = owed - 1 if owed > 0 else 0
            if owed <= 0:
                wait = due / self.base_hz - now
            else:
                gap = fast if (owed > 1 and misses < 2) else period
                wait = 0.0 if last < 0 else last + gap - now
                if owed == 1 and misses == 0:
                    wait = min(wait, 0.0)
            if wait > 0:
                self._stop.wait(min(wait, 0.05))
                continue
            status = self._fire()
            last = now
            with self._lock:
                st.attempts += 1
                if status > 0:
                    st.delivered += 1
                    if owed > 1:
                        st.catchup += 1
                    misses = 0
                elif status == 0:
                    st.coalesced += 1
                    if self.policy.lost_ticks is LostTicks.DISCARD:
                        st.dropped += 1
                    misses += 1
                else:
                    # The guest masked its timer: nothing is owed for that.
                    st.masked += 1
                    st.dropped += 1
                    misses += 1
                st.max_owed = max(st.max_owed, owed - 1)

    def __enter__(self) -> "HostTicker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def apply_pit_policy(vm: Vm, policy: TimerPolicy) -> None:
    """Program the in-kernel PIT's part of the policy."""
    set_pit_reinject(vm, policy.pit_reinject)
