"""Crash consistency: 200 SIGKILL trials, simulated power cuts with torn
and reordered writes, and SIGKILL trials with a flipped bit in the journal
(more in tests/stress/blockfile_crash.py)."""
from __future__ import annotations

import pytest

from hvkit.storage.crashtest import flip_trial, kill_trial, power_cut_trial

KILL_TRIALS = 200


def test_sigkill_trials(tmp_path):
    results = [kill_trial(str(tmp_path), seed) for seed in range(KILL_TRIALS)]
    bad = [(i, r.problems) for i, r in enumerate(results) if r.problems]
    assert not bad, bad[:3]
    # every trial is killed after at least one acknowledged array (counted,
    # not timed), and most leave committed transactions to replay
    assert all(r.acked >= 1 for r in results)
    assert sum(1 for r in results if r.replayed) > KILL_TRIALS // 2


@pytest.mark.parametrize("tear", [True, False], ids=["torn", "reordered"])
def test_power_cut_trials(tmp_path, tear):
    results = [power_cut_trial(str(tmp_path), 1000 + seed, tear=tear) for seed in range(60)]
    bad = [(i, r.problems) for i, r in enumerate(results) if r.problems]
    assert not bad, bad[:3]
    assert sum(r.acked for r in results) > 60


def test_a_flipped_bit_in_the_journal_after_sigkill_never_serves_wrong_data(tmp_path):
    results = [flip_trial(str(tmp_path), 5000 + seed) for seed in range(40)]
    bad = [(i, r.problems) for i, r in enumerate(results) if r.problems]
    assert not bad, bad[:3]
