"""KSM control on the real host: status, statistics, tuning that restores,
and per-page probing of memory that really merges."""
from __future__ import annotations

import mmap
import os
import time

import pytest

from hvkit.memory import ksm


def test_status_of_a_missing_directory_names_the_file(tmp_path):
    st = ksm.ksm_status(str(tmp_path / "ksm"))
    assert not st.available and not st.usable
    assert "CONFIG_KSM" in st.reason and str(tmp_path) in st.reason
    with pytest.raises(ksm.KsmError, match="not usable"):
        ksm.require_ksm(str(tmp_path / "ksm"))
    with pytest.raises(ksm.KsmError, match="does not exist"):
        ksm.read_stats(str(tmp_path / "ksm"))


def test_bad_tuning_values_are_refused_before_touching_anything():
    with pytest.raises(ksm.KsmError, match="pages_to_scan"):
        ksm.KsmTuning(pages_to_scan=-1)
    with pytest.raises(ksm.KsmError, match="unmerges everything"):
        ksm.KsmTuning(run=2)


def test_madvise_checks_its_range():
    m = mmap.mmap(-1, 8192, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        with pytest.raises(ksm.KsmError, match="page-aligned"):
            ksm.madvise(m, 100, 4096, ksm.MADV_MERGEABLE)
        with pytest.raises(ksm.KsmError, match="outside"):
            ksm.madvise(m, 4096, 8192, ksm.MADV_MERGEABLE)
    finally:
        m.close()


needs_ksm = pytest.mark.skipif(not ksm.ksm_status().available, reason="the kernel has no KSM")
needs_root_ksm = pytest.mark.skipif(not ksm.ksm_status().usable or os.geteuid() != 0,
                                    reason="tuning KSM and reading kpageflags need root")


@needs_ksm
def test_stats_read_the_real_sysfs():
    st = ksm.read_stats()
    assert st.run in (0, 1, 2)
    assert st.pages_to_scan > 0
    assert st.raw["pages_to_scan"] == st.pages_to_scan
    assert st.saved_bytes == st.pages_sharing * 4096
    stat = ksm.process_stat()
    if os.path.exists("/proc/self/ksm_stat"):
        assert isinstance(stat["ksm_rmap_items"], int)
        assert all(not k.endswith(":") for k in stat)


@needs_root_ksm
def test_tuning_applies_and_restores_even_on_error():
    before = ksm.read_stats()
    with pytest.raises(RuntimeError):
        with ksm.KsmTuning(pages_to_scan=before.pages_to_scan + 7, sleep_millisecs=3):
            now = ksm.read_stats()
            assert (now.run, now.pages_to_scan, now.sleep_millisecs) == \
                (1, before.pages_to_scan + 7, 3)
            raise RuntimeError("boom")
    after = ksm.read_stats()
    assert (after.run, after.pages_to_scan, after.sleep_millisecs) == \
        (before.run, before.pages_to_scan, before.sleep_millisecs)


@needs_root_ksm
def test_probe_sees_exactly_the_marked_pages_merge():
    n = 256
    a = mmap.mmap(-1, n * 4096, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    b = mmap.mmap(-1, n * 4096, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        for m in (a, b):
            for i in range(n):
                m[i * 4096:(i + 1) * 4096] = (b"%08d" % i) * 512
        from hvkit import _native
        ha, hb = _native.buffer_address(a), _native.buffer_address(b)
        half = n // 2
        ksm.madvise(a, 0, half * 4096, ksm.MADV_MERGEABLE)
        ksm.madvise(b, 0, half * 4096, ksm.MADV_MERGEABLE)
        with ksm.KsmTuning(pages_to_scan=10000, sleep_millisecs=0), ksm.KsmPageProbe() as probe:
            deadline = time.monotonic() + 20
            while probe.count(ha, half) < half and time.monotonic() < deadline:
                time.sleep(0.02)
            assert probe.count(ha, half) == half
            assert probe.count(hb, half) == half
            assert probe.pfns(ha, half) == probe.pfns(hb, half)
            assert len(ksm.shared_pfns(probe, [(ha, half), (hb, half)])) == half
            assert probe.count(ha + half * 4096, n - half) == 0   # never marked
            assert ksm.process_stat().get("ksm_merging_pages", half * 2) >= half * 2
            ksm.madvise(a, 0, half * 4096, ksm.MADV_UNMERGEABLE)
            assert probe.count(ha, half) == 0
            assert a[4096:4104] == b"00000001"
    finally:
        a.close()
        b.close()


@needs_root_ksm
def test_a_second_process_cannot_tune_while_one_does():
    import subprocess
    import sys
    code = ("import sys\nfrom hvkit.memory import ksm\n"
            "try:\n    ksm.KsmTuning(pages_to_scan=1234, lock_timeout=0.3).__enter__()\n"
            "except ksm.KsmError as e:\n    print(e); sys.exit(3)\n")
    before = ksm.read_stats()
    with ksm.KsmTuning(pages_to_scan=before.pages_to_scan + 1):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 3, r.stdout + r.stderr
        assert "tuning lock" in r.stdout
        assert ksm.read_stats().pages_to_scan == before.pages_to_scan + 1
    assert ksm.read_stats().pages_to_scan == before.pages_to_scan
