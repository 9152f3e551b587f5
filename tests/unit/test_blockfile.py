"""Block-file volumes: format, thin allocation, block maps, the write path."""
from __future__ import annotations

import os
import random

import pytest

from hvkit.errors import ConfigError
from hvkit.storage import blockmap as bm
from hvkit.storage.backend import BlockBackend, StorageError
from hvkit.storage.bitmap import VolumeFull
from hvkit.storage.superblock import Geometry
from hvkit.storage.vdisk import VirtualDisk
from hvkit.storage.volume import Volume
from hvkit.storage.writepath import sort_by_block

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


def small(cap: int = 4 * MiB, **kw) -> Geometry:
    kw.setdefault("block_size", 64 * KiB)
    kw.setdefault("sub_block_size", 8 * KiB)
    kw.setdefault("journal_size", 128 * KiB)
    kw.setdefault("max_files", 4)
    return Geometry.for_capacity(cap, **kw)


@pytest.fixture
def vol(tmp_path):
    v = Volume.create(str(tmp_path / "v.vol"), small())
    yield v
    v.close()


def test_new_disk_reads_zeros_and_uses_no_space(tmp_path):
    path = str(tmp_path / "v.vol")
    with Volume.create(path, Geometry.for_capacity(64 * GiB)) as v:
        before = v.f.allocated_bytes()
        f = v.create_file("d", 64 * GiB)
        assert v.read_bytes(f, 33 * GiB + 5, 8192) == bytes(8192)
        assert v.usage()["blocks_used"] == 0
        v.write(f, 10 * GiB, b"x" * 4096)
        grown = v.f.allocated_bytes() - before
    assert os.path.getsize(path) > 64 * GiB  # sparse host file
    assert grown < 2 * MiB  # one 1 MiB block plus a few metadata blocks


def test_one_tebibyte_disk_uses_triple_indirect_pointers(tmp_path):
    with Volume.create(str(tmp_path / "v.vol"), Geometry.for_capacity(64 * MiB)) as v:
        f = v.create_file("big", TiB)
        far = TiB - 4096
        assert bm.path(far // MiB)[0] == bm.SLOT_TRIPLE
        v.write_sg(f, [(b"a" * 4096, 0), (b"z" * 4096, far), (b"m" * 4096, 300 * GiB)])
        assert v.usage()["pointer_blocks_used"] >= 4
    with Volume.open(str(tmp_path / "v.vol")) as v:
        f = v.lookup("big")
        assert v.read_bytes(f, far, 4096) == b"z" * 4096
        assert v.read_bytes(f, 300 * GiB, 4096) == b"m" * 4096
        assert v.read_bytes(f, 300 * GiB + 4096, 4096) == bytes(4096)


def test_round_trip_random_writes_against_a_model(tmp_path):
    path = str(tmp_path / "v.vol")
    size = 3 * MiB + 12345
    model = bytearray(size)
    rng = random.Random(7)
    with Volume.create(path, small()) as v:
        f = v.create_file("d", size)
        for _ in range(40):
            sg = []
            for _ in range(rng.randint(1, 10)):
                n = rng.randint(1, 70000)
                off = rng.randrange(0, size - n)
                data = rng.randbytes(n)
                sg.append((data, off))
                model[off:off + n] = data
            v.write_sg(f, sg)
        assert v.read_bytes(f, 0, size) == model
    with Volume.open(path) as v:
        assert v.read_bytes(v.lookup("d"), 0, size) == model


def test_small_files_and_tails_live_in_sub_blocks(vol):
    tiny = vol.create_file("tiny", 5000)
    tail = vol.create_file("tail", 64 * KiB + 3000)
    vol.write(tiny, 0, b"t" * 5000)
    vol.write(tail, 0, b"h" * (64 * KiB + 3000))
    assert vol.resolve(tiny, 0).kind == bm.PK_SUB
    assert vol.resolve(tail, 0).kind == bm.PK_BLOCK
    assert vol.resolve(tail, 1).kind == bm.PK_SUB
    assert vol.usage()["sub_blocks_used"] == 2
    assert vol.read_bytes(tail, 64 * KiB, 3000) == b"h" * 3000


def test_several_disks_are_independent(vol):
    a = vol.create_file("a", MiB)
    b = vol.create_file("b", MiB)
    vol.write(a, 0, b"A" * 65536)
    vol.write(b, 0, b"B" * 65536)
    assert vol.read_bytes(a, 0, 65536) == b"A" * 65536
    assert vol.read_bytes(b, 0, 65536) == b"B" * 65536
    assert [fi.name for fi in vol.files()] == ["a", "b"]
    with pytest.raises(ConfigError, match="already exists"):
        vol.create_file("a", MiB)


def test_delete_frees_every_block(vol):
    a = vol.create_file("a", 2 * MiB)
    vol.write_sg(a, [(b"q" * 100, i * 64 * KiB) for i in range(32)])
    assert vol.usage()["blocks_used"] == 32
    vol.delete_file(a)
    u = vol.usage()
    assert u["blocks_used"] == u["pointer_blocks_used"] == u["sub_blocks_used"] == 0
    with pytest.raises(StorageError, match="no virtual disk named 'a'"):
        vol.lookup("a")


def test_discard_unmaps_whole_blocks_and_zeroes_partial_ones(vol):
    a = vol.create_file("a", MiB)
    vol.write(a, 0, b"x" * MiB)
    freed = vol.discard(a, 1000, 200 * KiB)
    assert freed == 2  # blocks 1 and 2 are wholly inside; 0 and 3 are partial
    assert vol.read_bytes(a, 0, 1000) == b"x" * 1000
    assert vol.read_bytes(a, 1000, 200 * KiB) == bytes(200 * KiB)
    assert vol.read_bytes(a, 1000 + 200 * KiB, 100) == b"x" * 100
    assert vol.resolve(a, 1) is None and vol.resolve(a, 0) is not None


def test_volume_full_is_a_clear_error_and_keeps_the_volume_usable(tmp_path):
    with Volume.create(str(tmp_path / "v.vol"), small(cap=256 * KiB)) as v:
        a = v.create_file("a", 4 * MiB)
        with pytest.raises(VolumeFull, match="no free file block"):
            v.write_sg(a, [(b"y", i * 64 * KiB) for i in range(6)])
        assert v.usage()["blocks_used"] == 4
        v.write(a, 0, b"still fine")
        assert v.read_bytes(a, 0, 10) == b"still fine"


@pytest.mark.parametrize("bad, match", [
    ([(b"x", -1)], "element 0.*outside the disk"),
    ([(b"ok", 0), (b"x" * 10, MiB - 5)], "element 1.*outside the disk"),
    ([(b"x", "0")], "element 0: offset '0' is not an int"),
    ([(12, 0)], "element 0: int is not a buffer"),
    ([b"x"], "element 0 is not a"),
])
def test_bad_scatter_gather_elements_are_refused_before_any_write(vol, bad, match):
    a = vol.create_file("a", MiB)
    with pytest.raises(StorageError, match=match):
        vol.write_sg(a, bad)
    assert vol.usage()["blocks_used"] == 0


def test_sort_by_block_groups_and_splits_elements():
    sets = sort_by_block([(b"a" * 10, 130), (b"b" * 100, 60), (b"c", 5)], 64, 1000)
    assert list(sets) == [0, 1, 2]
    assert [(o, bytes(m)) for o, m in sets[0]] == [(60, b"b" * 4), (5, b"c")]
    assert [(o, len(m)) for o, m in sets[1]] == [(0, 64)]
    # array order is kept inside a block, so the later element wins an overlap
    assert [(o, len(m)) for o, m in sets[2]] == [(2, 10), (0, 32)]


def test_later_element_wins_an_overlap(vol):
    a = vol.create_file("a", MiB)
    vol.write_sg(a, [(b"a" * 10, 130), (b"b" * 100, 60)])
    assert vol.read_bytes(a, 60, 100) == b"b" * 100


def test_batch_is_one_physical_transaction_with_shared_metadata_images(vol):
    a = vol.create_file("a", 4 * MiB)
    vol.stats.reset()
    r = vol.write_sg(a, [(b"d" * 4096, i * 64 * KiB + 512) for i in range(0, 60, 2)])
    assert (r.dependent_sets, r.logical_txns, r.physical_txns) == (30, 30, 1)
    s = vol.stats
    assert s.journal_writes == 1 and s.flushes == 2  # data barrier + commit
    assert s.journal_bytes <= 8 * 4096  # bitmap, descriptor, one pointer block...


def test_overwrites_need_no_transaction(vol):
    a = vol.create_file("a", MiB)
    vol.write(a, 0, b"1" * 8192)
    vol.stats.reset()
    r = vol.write_sg(a, [(b"2" * 512, 0), (b"3" * 512, 4096)])
    assert r.dependent_sets == 0 and vol.stats.journal_writes == 0
    assert vol.read_bytes(a, 0, 8192) == b"2" * 512 + b"1" * 3584 + b"3" * 512 + b"1" * 3584


def test_journal_wraps_and_checkpoints_under_load(tmp_path):
    path = str(tmp_path / "v.vol")
    with Volume.create(path, small(journal_size=64 * KiB)) as v:
        a = v.create_file("a", 3 * MiB)
        for i in range(48):
            v.write(a, i * 64 * KiB, bytes([i]) * 100)
        assert v.stats.checkpoints >= 3
    with Volume.open(path) as v:
        assert all(v.read_bytes(v.lookup("a"), i * 64 * KiB, 100) == bytes([i]) * 100
                   for i in range(48))


@pytest.mark.parametrize("kw, match", [
    (dict(block_size=3000), "block size 3000 must be a power of two"),
    (dict(sub_block_size=64 * KiB, block_size=64 * KiB), "smaller than the block size"),
    (dict(max_files=0), "max files 0"),
])
def test_bad_geometry_is_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        Geometry.for_capacity(MiB, **kw)


def test_too_small_journal_is_refused():
    with pytest.raises(ConfigError, match="journal of 1 blocks"):
        Geometry(64 * KiB, 8 * KiB, n_blocks=10, n_sub=4, n_ptr=40, max_files=4,
                 journal_blocks=1)


def test_open_refuses_a_file_that_is_not_a_volume(tmp_path):
    p = tmp_path / "junk"
    p.write_bytes(os.urandom(16384))
    with pytest.raises(StorageError, match="not a usable block-file volume.*bad magic"):
        Volume.open(str(p))


def test_backup_superblock_is_used_when_the_primary_is_damaged(tmp_path):
    path = str(tmp_path / "v.vol")
    Volume.create(path, small()).close()
    with open(path, "r+b") as fh:
        fh.seek(100)
        fh.write(b"\xff" * 8)
    with Volume.open(path) as v:
        assert v.geom.block_size == 64 * KiB


def test_virtual_disk_is_a_block_backend(tmp_path):
    path = str(tmp_path / "v.vol")
    with Volume.create(path, small()) as v:
        v.create_file("d", MiB)
    disk = VirtualDisk.open(path, "d")
    assert isinstance(disk, BlockBackend)
    assert disk.size == MiB and disk.block_size == 512
    disk.write(4096, b"hello")
    disk.write_sg([(b"a", 0), (b"b", 700000)])
    buf = bytearray(5)
    disk.readinto(4096, memoryview(buf))
    assert buf == b"hello"
    disk.write_zeroes(0, MiB)
    disk.readinto(4096, memoryview(buf))
    assert buf == bytes(5)
    with pytest.raises(StorageError, match="outside the disk"):
        disk.readinto(MiB - 2, memoryview(buf))
    disk.flush()
    disk.close()
    ro = VirtualDisk(Volume.open(path), "d", read_only=True, owns_volume=True)
    with pytest.raises(StorageError, match="read-only"):
        ro.write(0, b"x")
    ro.close()


def test_host_file_reads_past_its_end_as_zeros_in_bytes_not_items(tmp_path):
    import array
    from hvkit.storage.hostfile import HostFile
    path = str(tmp_path / "h")
    with open(path, "wb") as fh:
        fh.write(b"\xab" * 100)
    f = HostFile(path)
    words = array.array("Q", [0xFFFFFFFFFFFFFFFF] * 64)  # 64 items, 512 bytes
    f.preadinto(0, memoryview(words))
    assert words.tobytes() == b"\xab" * 100 + bytes(412)
    f.pwrite(1000, memoryview(array.array("I", [0x01020304] * 8)))
    assert f.pread(1000, 33) == bytes([4, 3, 2, 1]) * 8 + b"\0"
    f.close()
