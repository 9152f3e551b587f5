"""Page runs and page providers: a diff chain read through ChainProvider
gives, page for page, what applying the diffs in order gives."""
import os

from hypothesis import given, settings, strategies as st
import pytest

from hvkit.memory.guest import GuestMemory
from hvkit.snapshot import SnapshotError
from hvkit.snapshot.pages import ChainProvider, DiffLayer, FileProvider, check_runs, runs_of

PAGE = 4096
NPAGES = 24


def test_runs_of_joins_neighbours():
    assert runs_of([5, 1, 2, 3, 9, 10, 3]) == [[1, 3], [5, 1], [9, 2]]
    assert runs_of([]) == []


@given(st.sets(st.integers(0, 200)))
def test_runs_round_trip(pages):
    runs = runs_of(pages)
    assert check_runs(runs, 201, "t") == runs
    assert {f + i for f, c in runs for i in range(c)} == pages


@given(st.lists(st.tuples(st.integers(-3, 300), st.integers(-3, 300)), max_size=6))
def test_check_runs_refuses_what_does_not_fit(runs):
    ok = True
    end = 0
    for first, count in runs:
        if first < end or count <= 0 or first + count > 200:
            ok = False
            break
        end = first + count
    if ok:
        assert check_runs(runs, 200, "t") == [list(r) for r in runs]
    else:
        with pytest.raises(SnapshotError, match="damaged page list"):
            check_runs(runs, 200, "t")


@pytest.mark.parametrize("bad", [None, 5, [[1]], [["a", 1]], [[1, 2, 3]]])
def test_check_runs_refuses_damaged_lists(bad):
    with pytest.raises(SnapshotError):
        check_runs(bad, 10, "snap")


def write_layer(path, pages_data):
    """A memory file of one region of NPAGES pages holding ``pages_data``."""
    with open(path, "wb") as f:
        f.truncate(NPAGES * PAGE)
        for page, byte in pages_data.items():
            if byte:                      # a zero page stays a hole
                f.seek(page * PAGE)
                f.write(bytes([byte]) * PAGE)


@settings(max_examples=60, deadline=None)
@given(base=st.dictionaries(st.integers(0, NPAGES - 1), st.integers(0, 255)),
       diffs=st.lists(st.dictionaries(st.integers(0, NPAGES - 1), st.integers(0, 255)),
                      max_size=3),
       block=st.sampled_from([1, 2, 4, 8]), start=st.integers(0, NPAGES - 1))
def test_chain_provider_is_the_diffs_applied_in_order(tmp_path_factory, base, diffs, block,
                                                      start):
    d = tmp_path_factory.mktemp("chain")
    regions = [{"offset": 0}]
    want = bytearray(NPAGES * PAGE)
    for page, byte in base.items():
        want[page * PAGE:(page + 1) * PAGE] = bytes([byte]) * PAGE
    write_layer(d / "base", base)
    layers = []
    for i, diff in enumerate(diffs):
        write_layer(d / f"d{i}", diff)
        for page, byte in diff.items():
            want[page * PAGE:(page + 1) * PAGE] = bytes([byte]) * PAGE
        layers.append(DiffLayer(str(d / f"d{i}"), regions, [runs_of(diff)]))
    provider = ChainProvider(FileProvider(str(d / "base"), regions), layers)
    try:
        start = start // block * block
        n = min(block, NPAGES - start) * PAGE
        out = bytearray(n)
        provider.read(0, start * PAGE, memoryview(out))
        assert out == want[start * PAGE:start * PAGE + n]
    finally:
        provider.close()


def test_host_writes_are_tracked_by_page():
    with GuestMemory.create(1 << 20) as mem:
        mem.write(0x1000, b"x")
        assert mem.take_written() == set()          # not tracking yet
        mem.track_writes()
        mem.write(0x1FFF, b"ab")                     # crosses into the next page
        mem.fill(0x5000, 1)
        mem.view(0x8000, 1)                          # may be written through
        mem.read(0x9000, 1)                          # a read is not a write
        assert mem.take_written() == {1, 2, 5, 8}
        assert mem.take_written() == set()
        mem.untrack_writes()
        mem.write(0x1000, b"x")
        assert mem.take_written() == set()


def test_file_provider_reads_past_the_end_as_zeros(tmp_path):
    p = tmp_path / "m"
    p.write_bytes(b"\x07" * 100)
    fp = FileProvider(str(p), [{"offset": 0}])
    out = bytearray(b"\xff" * PAGE)
    fp.read(0, 0, memoryview(out))
    fp.close()
    assert out == b"\x07" * 100 + bytes(PAGE - 100)
    with pytest.raises(SnapshotError, match="cannot open"):
        FileProvider(str(tmp_path / "none"), [{"offset": 0}])
    assert not os.path.exists(tmp_path / "none")
