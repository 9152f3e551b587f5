"""Pure helpers of dirty tracking and dedup: bitmap decoding and runs."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from hvkit.errors import ConfigError
from hvkit.memory.dedup import _runs
from hvkit.memory.dirty import bitmap_pages, pages_bitmap


def test_bitmap_layout_is_kvms():
    bm = bytearray(16)
    bm[0] = 0b101          # pages 0 and 2
    bm[8] = 0x80           # page 71
    assert bitmap_pages(bm) == [0, 2, 71]
    assert bitmap_pages(bm, npages=71) == [0, 2]
    assert len(pages_bitmap([0], 65)) == 16


@given(st.integers(1, 3000).flatmap(
    lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1)))))
def test_bitmap_roundtrip(case):
    n, pages = case
    assert bitmap_pages(pages_bitmap(pages, n), n) == sorted(pages)


def test_pages_outside_the_slot_are_refused():
    with pytest.raises(ConfigError, match="outside a 10-page slot"):
        pages_bitmap([10], 10)


@given(st.sets(st.integers(0, 500)))
def test_runs_cover_exactly_the_pages(pages):
    runs = _runs(list(pages))
    covered = [p for start, n in runs for p in range(start, start + n)]
    assert covered == sorted(pages)
    for (a, n), (b, _) in zip(runs, runs[1:]):
        assert a + n < b          # maximal: runs never touch
