"""Guest time: TSC scaling arithmetic (``tsc``), per-VM TSC programming and
saved state (``clock``), the timer-interrupt policy that keeps a guest's
clock coherent (``ticks``), and guest-side measurement (``probe``)."""
from hvkit.time.tsc import AMD, INTEL, TscError, TscMode, TscPlan, plan, ratio_for

__all__ = ["AMD", "INTEL", "TscError", "TscMode", "TscPlan", "plan", "ratio_for"]
