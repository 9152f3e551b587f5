"""Waiting for ksmd on a host where KSM starts off and nothing is mergeable
(a fresh machine): the wait must end, not time out."""
from __future__ import annotations

import mmap
import time

import pytest

from hvkit.memory import ksm


@pytest.fixture
def ksm_off():
    st = ksm.ksm_status()
    if not st.usable:
        pytest.skip(f"KSM not usable: {st.reason}")
    # As a fresh machine boots: ksmd stopped (and, unless another process
    # here uses KSM, nothing mergeable).
    with ksm.KsmTuning(run=0, pages_to_scan=10000, sleep_millisecs=0) as tuning:
        yield tuning


def test_full_scans_happen_when_nothing_else_is_mergeable(ksm_off):
    ksm_off.set(run=1)
    t0 = time.monotonic()
    before = ksm.read_stats().full_scans
    reached = ksm.wait_full_scans(2, timeout=20)
    assert reached >= before + 2
    assert time.monotonic() - t0 < 20


def test_a_stopped_ksm_is_refused_at_once(ksm_off):
    with pytest.raises(ksm.KsmError, match="run=0"):
        ksm.wait_full_scans(1, timeout=5)


def mergeable_mappings() -> int:
    with open("/proc/self/smaps") as f:
        return sum(1 for line in f if line.startswith("VmFlags:") and " mg" in line)


def test_scan_anchor_registers_one_page_and_releases_it():
    try:
        mmap.mmap(-1, 4096).madvise(ksm.MADV_MERGEABLE)
    except OSError as exc:
        pytest.skip(f"MADV_MERGEABLE refused here: {exc}")
    base = mergeable_mappings()
    with ksm.ScanAnchor():
        assert mergeable_mappings() == base + 1
    assert mergeable_mappings() == base


def test_set_inside_a_tuning_is_restored_and_limited(ksm_off):
    ksm_off.set(pages_to_scan=123)
    assert ksm.read_stats().pages_to_scan == 123
    with pytest.raises(ksm.KsmError, match="run=2 refused"):
        ksm_off.set(run=2)


def test_set_refuses_a_knob_the_tuning_would_not_restore():
    st = ksm.ksm_status()
    if not st.usable:
        pytest.skip(f"KSM not usable: {st.reason}")
    with ksm.KsmTuning(run=0) as t:
        with pytest.raises(ksm.KsmError, match="would not be restored"):
            t.set(sleep_millisecs=5)
