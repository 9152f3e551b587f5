"""The redo journal: commit, replay, torn transactions, wrap."""
from __future__ import annotations

import pytest

from hvkit.storage import metablock as mb
from hvkit.storage.hostfile import HostFile
from hvkit.storage.journal import Journal, JournalError
from hvkit.storage.superblock import JOURNAL_START, JSB_A, JSB_B, Geometry
from hvkit.storage.volume import Volume


@pytest.fixture
def vol_path(tmp_path):
    path = str(tmp_path / "v.vol")
    Volume.create(path, Geometry.for_capacity(1 << 20, block_size=64 << 10,
                                              sub_block_size=8 << 10,
                                              journal_size=64 << 10)).close()
    return path


def image(geom: Geometry, fill: int, n: int = 0) -> tuple[int, bytearray]:
    bno = geom.ptr_start + n
    buf = mb.new_block(mb.KIND_PTR, bno)
    buf[mb.HDR:mb.HDR + 8] = bytes([fill]) * 8
    return bno, mb.seal(buf, 0)


def test_committed_transactions_are_replayed_in_order(vol_path):
    f = HostFile(vol_path)
    geom = Volume.read_geometry(f)[0]
    j = Journal(f, geom)
    j.commit([image(geom, 1), image(geom, 7, 1)])
    j.commit([image(geom, 2)])
    assert f.stats.journal_writes == 2 and f.stats.flushes == 2
    j2 = Journal(f, geom)
    rep = j2.replay()
    assert (rep.replayed, rep.images, rep.stopped) == (2, 3, "")
    assert f.pread(geom.ptr_start * mb.META + mb.HDR, 1) == b"\x02"
    assert f.pread((geom.ptr_start + 1) * mb.META + mb.HDR, 1) == b"\x07"
    assert Journal(f, geom).replay().replayed == 0  # the replay checkpointed
    f.close()


@pytest.mark.parametrize("where", ["header", "image", "commit"])
def test_a_torn_transaction_is_discarded_with_everything_after_it(vol_path, where):
    f = HostFile(vol_path)
    geom = Volume.read_geometry(f)[0]
    j = Journal(f, geom)
    j.commit([image(geom, 1)])
    off = j.head
    j.commit([image(geom, 2), image(geom, 3, 1)])
    j.commit([image(geom, 4)])
    victim = {"header": off, "image": off + 2, "commit": off + 3}[where]
    f.pwrite((JOURNAL_START + victim) * mb.META + 1000, b"\xde\xad")
    rep = Journal(f, geom).replay()
    assert rep.replayed == 1 and "transaction 2" in rep.stopped
    assert f.pread(geom.ptr_start * mb.META + mb.HDR, 1) == b"\x01"
    f.close()


def test_wrap_moves_the_start_and_old_transactions_stay_dead(vol_path):
    f = HostFile(vol_path)
    geom = Volume.read_geometry(f)[0]
    j = Journal(f, geom)
    for i in range(20):  # 16-block ring, 3 blocks a transaction
        j.commit([image(geom, i)])
    assert f.stats.checkpoints >= 3
    rep = Journal(f, geom).replay()
    assert rep.next_seq == 21
    assert f.pread(geom.ptr_start * mb.META + mb.HDR, 1) == bytes([19])
    f.close()


def test_too_big_a_transaction_is_refused(vol_path):
    f = HostFile(vol_path)
    geom = Volume.read_geometry(f)[0]
    with pytest.raises(JournalError, match="does not fit"):
        Journal(f, geom).commit([image(geom, 0, i) for i in range(15)])
    f.close()


def test_a_damaged_journal_superblock_falls_back_to_the_other(vol_path):
    f = HostFile(vol_path)
    geom = Volume.read_geometry(f)[0]
    j = Journal(f, geom)
    j.commit([image(geom, 5)])
    j.checkpoint()  # the newest copy now starts after that transaction
    newest = JSB_A if j.sb_gen % 2 else JSB_B
    f.pwrite(newest * mb.META + 40, b"\xff")
    j2 = Journal(f, geom)
    assert j2.sb_gen == j.sb_gen - 1  # the other copy: replaying again is harmless
    assert j2.replay().replayed == 1
    f.pwrite(JSB_A * mb.META + 40, b"\xff")
    f.pwrite(JSB_B * mb.META + 40, b"\xfe")
    with pytest.raises(JournalError, match="both journal superblocks"):
        Journal(f, geom)
    f.close()


def test_checkpoint_after_a_transaction_that_fills_the_ring_exactly(vol_path):
    f = HostFile(vol_path)
    geom = Volume.read_geometry(f)[0]
    j = Journal(f, geom)
    j.checkpoint(wrap=True)
    j.commit([image(geom, 1, i) for i in range(geom.journal_blocks - 2)])
    assert j.head == geom.journal_blocks
    j.checkpoint()
    assert j.start_off == 0
    j2 = Journal(f, geom)  # reopens: the start is inside the ring
    assert j2.replay().replayed == 0
    j2.commit([image(geom, 9)])
    assert Journal(f, geom).replay().replayed == 1
    f.close()
