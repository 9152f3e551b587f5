"""Longer crash-consistency run for block-file volumes.

    python tests/stress/blockfile_crash.py [--kills 2000] [--cuts 2000] [--flips 500] [--seed 0]

Runs SIGKILL trials, simulated power cuts (torn and reordered writes) and
SIGKILL trials with a flipped bit in the journal
from ``hvkit.storage.crashtest``; prints progress and a JSON summary, and
exits non-zero on the first trial that leaves an inconsistency.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

from hvkit.storage.crashtest import flip_trial, kill_trial, power_cut_trial


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=2000)
    ap.add_argument("--cuts", type=int, default=2000)
    ap.add_argument("--flips", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-delay", type=float, default=0.005,
                    help="longest wait after the chosen acknowledgement before the "
                         "SIGKILL, seconds")
    args = ap.parse_args()
    summary = {"kill_trials": 0, "power_cut_trials": 0, "flip_trials": 0,
               "acknowledged_arrays": 0,
               "trials_with_replay": 0, "failures": []}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hvkit-crash-") as d:
        plan = [("kill", args.seed + i) for i in range(args.kills)]
        plan += [("cut", args.seed + 10**6 + i) for i in range(args.cuts)]
        plan += [("flip", args.seed + 2 * 10**6 + i) for i in range(args.flips)]
        for n, (kind, seed) in enumerate(plan, 1):
            if kind == "kill":
                r = kill_trial(d, seed, max_delay=args.max_delay)
                summary["kill_trials"] += 1
            elif kind == "flip":
                r = flip_trial(d, seed, max_delay=args.max_delay)
                summary["flip_trials"] += 1
            else:
                r = power_cut_trial(d, seed, tear=seed % 2 == 0)
                summary["power_cut_trials"] += 1
            summary["acknowledged_arrays"] += r.acked
            summary["trials_with_replay"] += bool(r.replayed)
            if r.problems:
                summary["failures"].append({"kind": kind, "seed": seed,
                                            "problems": r.problems[:5]})
                print(f"\nFAILED {kind} trial seed {seed}: {r.problems[:3]}", file=sys.stderr)
                break
            if n % 100 == 0:
                print(f"\r{n}/{len(plan)} trials, {time.monotonic() - t0:.0f} s",
                      end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    summary["seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps(summary, indent=2))
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
