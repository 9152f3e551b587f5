"""`check` finds every kind of inconsistency and `--repair` fixes it."""
from __future__ import annotations

import os

import pytest

from hvkit.storage import blockmap as bm
from hvkit.storage import metablock as mb
from hvkit.storage.backend import StorageError
from hvkit.storage.check import EXIT_CLEAN, EXIT_CORRECTED, EXIT_UNCORRECTED, check_volume
from hvkit.storage.superblock import Geometry
from hvkit.storage.volume import Volume

BS = 64 << 10


@pytest.fixture
def volume(tmp_path):
    path = str(tmp_path / "v.vol")
    with Volume.create(path, Geometry.for_capacity(4 << 20, block_size=BS,
                                                   sub_block_size=8 << 10,
                                                   max_files=4, journal_size=64 << 10)) as v:
        a = v.create_file("a", 40 << 20)
        v.write_sg(a, [(bytes([i + 1]) * 4096, i * BS) for i in range(3)])
        v.write(a, 600 * BS, b"far")  # through a single-indirect pointer block
        b = v.create_file("b", 2 * BS)
        v.write(b, 0, b"B" * 100)
        geom = v.geom
    return path, geom


def edit(path: str, bno: int, fn, reseal: bool = True) -> None:
    with open(path, "r+b") as fh:
        fh.seek(bno * mb.META)
        buf = bytearray(fh.read(mb.META))
        fn(buf)
        if reseal:
            mb.seal(buf)
        fh.seek(bno * mb.META)
        fh.write(buf)


def codes(report) -> set[str]:
    return {p.code for p in report.problems}


def repair_and_confirm(path: str) -> None:
    rep = check_volume(path, repair=True)
    assert rep.exit_code(repaired=True) == EXIT_CORRECTED and rep.repaired
    again = check_volume(path)
    assert again.clean, [str(p) for p in again.problems]
    with Volume.open(path) as v:  # and the volume is usable
        v.write(v.lookup("a"), 5 * BS, b"after repair")


def test_a_fresh_and_used_volume_is_clean(volume):
    rep = check_volume(volume[0])
    assert rep.clean and rep.files == 2 and rep.exit_code(False) == EXIT_CLEAN


def test_leaked_block(volume):
    path, geom = volume
    edit(path, geom.bitmap_start(0), lambda b: b.__setitem__(mb.HDR + 5, 0xFF))
    rep = check_volume(path)
    assert codes(rep) == {"leaked-block"} and rep.exit_code(False) == EXIT_UNCORRECTED
    repair_and_confirm(path)


def test_referenced_block_marked_free(volume):
    path, geom = volume
    edit(path, geom.bitmap_start(0), lambda b: b.__setitem__(mb.HDR, 0))
    assert "unallocated-reference" in codes(check_volume(path))
    repair_and_confirm(path)


def test_double_allocation_gets_its_own_copy(volume):
    path, geom = volume
    with Volume.open(path) as v:
        shared = v.resolve(v.lookup("a"), 1).index
    bdesc = geom.desc_start + 1
    edit(path, bdesc, lambda b: bm.set_u64(b, bm.slot_offset(1), bm.make_ptr(bm.PK_BLOCK, shared)))
    rep = check_volume(path)
    assert "double-allocation" in codes(rep)
    repair_and_confirm(path)
    with Volume.open(path) as v:
        a, b = v.lookup("a"), v.lookup("b")
        assert v.resolve(a, 1).index != v.resolve(b, 1).index
        assert v.read_bytes(b, BS, 4096) == bytes([2]) * 4096  # the copy
        assert v.read_bytes(a, BS, 4096) == bytes([2]) * 4096


@pytest.mark.parametrize("ptr", [bm.make_ptr(bm.PK_BLOCK, 10**9), (1 << 62) | (5 << 48) | 1,
                                 bm.make_ptr(bm.PK_PTR, 0)])
def test_pointer_out_of_range_or_of_the_wrong_kind(volume, ptr):
    path, geom = volume
    edit(path, geom.desc_start, lambda b: bm.set_u64(b, bm.slot_offset(7), ptr))
    assert "pointer-out-of-range" in codes(check_volume(path))
    repair_and_confirm(path)


def test_bad_checksums(volume):
    path, geom = volume
    edit(path, geom.bitmap_start(2), lambda b: b.__setitem__(100, b[100] ^ 1), reseal=False)
    with Volume.open(path) as v:
        pb = bm.decode_ptr(bm.get_u64(v._desc(0), bm.slot_offset(bm.SLOT_SINGLE)), geom)[1]
    edit(path, geom.ptr_start + pb, lambda b: b.__setitem__(3000, b[3000] ^ 1), reseal=False)
    rep = check_volume(path)
    assert [p.code for p in rep.problems].count("bad-checksum") == 2
    assert any("pointer block" in p.message for p in rep.problems)
    repair_and_confirm(path)
    with Volume.open(path) as v:  # the pointers in the damaged block are kept
        assert v.read_bytes(v.lookup("a"), 600 * BS, 3) == b"far"


def test_a_damaged_descriptor_keeps_its_disk_and_data(volume):
    path, geom = volume
    edit(path, geom.desc_start + 1, lambda b: b.__setitem__(50, b[50] ^ 4), reseal=False)
    rep = check_volume(path)
    assert "bad-checksum" in codes(rep)
    repair_and_confirm(path)
    with Volume.open(path) as v:
        assert [f.name for f in v.files()] == ["a", "b"]
        assert v.read_bytes(v.lookup("b"), 0, 100) == b"B" * 100


@pytest.mark.parametrize("where", [32 + 20, 32 + 40, 192 + 8 * bm.N_DIRECT + 3])
def test_a_flipped_byte_in_a_descriptor_loses_no_data(volume, where):
    path, geom = volume
    edit(path, geom.desc_start, lambda b: b.__setitem__(where, b[where] ^ 0x10), reseal=False)
    rep = check_volume(path, repair=True)
    assert rep.repaired
    assert check_volume(path).clean
    with Volume.open(path) as v:
        a = v.lookup("a")
        for i in range(3):
            assert v.read_bytes(a, i * BS, 4096) == bytes([i + 1]) * 4096
        assert v.read_bytes(a, 600 * BS, 3) == b"far"


def test_data_a_damaged_pointer_led_to_goes_to_lost_and_found(volume):
    path, geom = volume
    # block 1 of disk a now points out of range, two bytes off: its data
    # block is orphaned and no single-byte change explains the damage
    def damage(b):
        b[192 + 8 + 5] = 0x7F
        b[192 + 8] ^= 0x55
    edit(path, geom.desc_start, damage, reseal=False)
    rep = check_volume(path, repair=True)
    assert rep.exit_code(True) == EXIT_UNCORRECTED  # a disk lost a block: say so
    assert any("lost+found" in r for r in rep.repaired)
    assert check_volume(path).clean
    with Volume.open(path) as v:
        names = [f.name for f in v.files()]
        assert "a" in names and "lost+found" in names
        lf = v.lookup("lost+found")
        assert v.read_bytes(lf, 0, 4096) == bytes([2]) * 4096
        a = v.lookup("a")
        assert v.read_bytes(a, 0, 4096) == bytes([1]) * 4096
        assert v.read_bytes(a, 2 * BS, 4096) == bytes([3]) * 4096


def test_damaged_primary_superblock_is_restored(volume):
    path, _ = volume
    edit(path, 0, lambda b: b.__setitem__(40, b[40] ^ 1), reseal=False)
    assert "bad-checksum" in codes(check_volume(path))
    repair_and_confirm(path)


def test_both_superblocks_lost_is_not_fixable(volume):
    path, _ = volume
    for bno in (0, 1):
        edit(path, bno, lambda b: b.__setitem__(0, 0), reseal=False)
    rep = check_volume(path, repair=True)
    assert rep.fatal and rep.exit_code(True) == EXIT_UNCORRECTED


def test_every_problem_is_reported_not_just_the_first(volume):
    path, geom = volume
    edit(path, geom.bitmap_start(0), lambda b: b.__setitem__(mb.HDR + 7, 0xF0))
    edit(path, geom.desc_start, lambda b: bm.set_u64(b, bm.slot_offset(9),
                                                     bm.make_ptr(bm.PK_SUB, 10**6)))
    rep = check_volume(path)
    assert codes(rep) == {"leaked-block", "pointer-out-of-range"}
    assert sum(p.code == "leaked-block" for p in rep.problems) == 4


def test_a_truncated_volume_is_refused_and_check_reports_the_lost_blocks(tmp_path):
    path = str(tmp_path / "t.vol")
    with Volume.create(path, Geometry.for_capacity(8 << 20)) as v:
        d = v.create_file("r", 8 << 20)
        v.write(d, 0, os.urandom(8 << 20))
    os.truncate(path, os.path.getsize(path) - (5 << 20))
    with pytest.raises(StorageError, match="truncated"):
        Volume.open(path)
    rep = check_volume(path)
    assert "truncated" in codes(rep) and rep.exit_code(False) == EXIT_UNCORRECTED
    assert any("lost" in p.message for p in rep.problems)
    rep = check_volume(path, repair=True)
    assert rep.exit_code(True) == EXIT_UNCORRECTED  # the data past the cut is gone
    with Volume.open(path) as v:  # but the volume is whole again
        assert v.read_bytes(v.lookup("r"), 0, 10) != bytes(10)


def test_a_truncation_that_loses_no_data_is_repaired(volume):
    path, geom = volume
    os.truncate(path, os.path.getsize(path) - 2 * BS)
    with pytest.raises(StorageError, match="truncated"):
        Volume.open(path)
    assert "truncated" in codes(check_volume(path))
    repair_and_confirm(path)


def test_a_pointer_one_byte_off_an_orphaned_unit_is_restored(volume):
    path, geom = volume
    edit(path, geom.desc_start, lambda b: b.__setitem__(192 + 8 + 5, 0x7F), reseal=False)
    rep = check_volume(path, repair=True)
    assert "pointer-damaged" in codes(rep) and rep.exit_code(True) == EXIT_CORRECTED
    assert check_volume(path).clean
    with Volume.open(path) as v:
        assert v.read_bytes(v.lookup("a"), BS, 4096) == bytes([2]) * 4096


def test_a_pointer_block_with_a_wrecked_header_keeps_the_blocks_it_maps(tmp_path):
    path = str(tmp_path / "p.vol")
    with Volume.create(path, Geometry.for_capacity(4 << 20, block_size=BS,
                                                   sub_block_size=8 << 10,
                                                   journal_size=64 << 10)) as v:
        d = v.create_file("d", 40 << 20)
        v.write_sg(d, [(bytes([i]) * 512, (bm.N_DIRECT + i) * BS) for i in range(1, 21)])
        pb = bm.decode_ptr(bm.get_u64(v._desc(d), bm.slot_offset(bm.SLOT_SINGLE)), v.geom)[1]
        geom = v.geom
    edit(path, geom.ptr_start + pb, lambda b: b.__setitem__(slice(0, 32), b"\xee" * 32),
         reseal=False)
    rep = check_volume(path, repair=True)
    assert rep.exit_code(True) == EXIT_CORRECTED
    assert check_volume(path).clean
    with Volume.open(path) as v:
        d = v.lookup("d")
        for i in range(1, 21):
            assert v.read_bytes(d, (bm.N_DIRECT + i) * BS, 512) == bytes([i]) * 512
