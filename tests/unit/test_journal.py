"""The redo journal: commit, replay, torn transactions, wrap."""
from __future__ import annotations

import random
import struct

import pytest

from hvkit.storage import metablock as mb
from hvkit.storage.backend import StorageError
from hvkit.storage.check import EXIT_CORRECTED, check_volume
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
def test_a_torn_last_transaction_is_the_end_of_the_log(vol_path, where):
    f = HostFile(vol_path)
    geom = Volume.read_geometry(f)[0]
    j = Journal(f, geom)
    j.commit([image(geom, 1)])
    off = j.head
    j.commit([image(geom, 2), image(geom, 3, 1)])
    victim = {"header": off, "image": off + 2, "commit": off + 3}[where]
    f.pwrite((JOURNAL_START + victim) * mb.META + 1000, b"\xde\xad")
    rep = Journal(f, geom).replay()
    assert rep.replayed == 1 and not rep.lost and not rep.damaged
    assert where == "header" or "transaction 2" in rep.stopped
    assert f.pread(geom.ptr_start * mb.META + mb.HDR, 1) == b"\x01"
    f.close()


@pytest.mark.parametrize("where, outcome", [("header", "lost"), ("image", "lost"),
                                            ("commit", "recovered")])
def test_a_damaged_transaction_with_a_later_one_was_committed(vol_path, where, outcome):
    f = HostFile(vol_path)
    geom = Volume.read_geometry(f)[0]
    j = Journal(f, geom)
    j.commit([image(geom, 1)])
    off = j.head
    j.commit([image(geom, 2), image(geom, 3, 1)])
    j.commit([image(geom, 4)])
    victim = {"header": off, "image": off + 2, "commit": off + 3}[where]
    f.pwrite((JOURNAL_START + victim) * mb.META + 1000, b"\xde\xad")
    scan = Journal(f, geom).scan()
    if outcome == "lost":
        assert scan.lost and "transaction 2" in scan.lost[0]
    else:
        assert not scan.lost and "transaction 2" in scan.damaged[0]
        rep = Journal(f, geom).replay()
        assert rep.replayed == 3
        assert f.pread((geom.ptr_start + 1) * mb.META + mb.HDR, 1) == b"\x03"
        assert f.pread(geom.ptr_start * mb.META + mb.HDR, 1) == b"\x04"
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


# -- replay never goes back in time --------------------------------------------

def _unclean_volume(tmp_path, writes, journal_size=64 << 10):
    """A volume with acknowledged writes whose process stopped without a
    checkpoint (as after SIGKILL): in-place metadata written, ring not freed."""
    path = str(tmp_path / "u.vol")
    v = Volume.create(path, Geometry.for_capacity(1 << 20, block_size=64 << 10,
                                                  sub_block_size=8 << 10,
                                                  journal_size=journal_size))
    fidx = v.create_file("d", 1 << 20)
    v.journal.checkpoint()
    offs = []
    for data, off in writes:
        v.write(fidx, off, data)
        offs.append((v.journal.head, v.journal.next_seq - 1))
    geom = v.geom
    v.f.close()  # no checkpoint
    return path, geom, offs


def _flip(path, byte_offset, mask=0x01):
    with open(path, "r+b") as fh:
        fh.seek(byte_offset)
        b = fh.read(1)[0]
        fh.seek(byte_offset)
        fh.write(bytes([b ^ mask]))


def _ring_txns(path, geom):
    """(offset, seq, n_images) of every sound transaction header in the ring."""
    with open(path, "rb") as fh:
        fh.seek(JOURNAL_START * mb.META)
        ring = fh.read(geom.journal_blocks * mb.META)
    out = []
    for off in range(geom.journal_blocks):
        buf = ring[off * mb.META:(off + 1) * mb.META]
        if mb.is_sound(buf, mb.KIND_JHEADER, JOURNAL_START + off):
            seq, n, _ = struct.unpack_from("<QII", buf, mb.HDR)
            out.append((off, seq, n))
    return out


def test_a_damaged_commit_does_not_roll_metadata_back(tmp_path):
    path, geom, _ = _unclean_volume(tmp_path, [(b"A" * 4096, 0), (b"B" * 4096, 128 << 10)])
    txns = _ring_txns(path, geom)
    off, seq, n = max(txns, key=lambda t: t[1])
    _flip(path, (JOURNAL_START + off + n + 1) * mb.META + 200)  # its commit block
    with Volume.open(path) as v:
        d = v.lookup("d")
        assert v.read_bytes(d, 0, 4096) == b"A" * 4096
        assert v.read_bytes(d, 128 << 10, 4096) == b"B" * 4096
    assert check_volume(path).clean


def test_check_reports_a_damaged_journal_record(tmp_path):
    path, geom, _ = _unclean_volume(tmp_path, [(b"A" * 4096, 0), (b"B" * 4096, 128 << 10)])
    off, seq, n = max(_ring_txns(path, geom), key=lambda t: t[1])
    _flip(path, (JOURNAL_START + off + n + 1) * mb.META + 200)
    rep = check_volume(path)
    assert "journal-damaged" in {p.code for p in rep.problems}
    rep = check_volume(path, repair=True)
    assert rep.exit_code(repaired=True) == EXIT_CORRECTED
    assert check_volume(path).clean
    with Volume.open(path) as v:
        assert v.read_bytes(v.lookup("d"), 128 << 10, 4096) == b"B" * 4096


def test_falling_back_to_the_older_journal_superblock_replays_nothing_stale(tmp_path):
    # a 16-block ring: a clean close leaves the start inside it, two more
    # writes wrap it, then the newest journal superblock is damaged
    path = str(tmp_path / "w.vol")
    v = Volume.create(path, Geometry.for_capacity(1 << 20, block_size=64 << 10,
                                                  sub_block_size=8 << 10,
                                                  journal_size=64 << 10))
    d = v.create_file("d", 1 << 20)
    while v.journal.head < 10:
        v.write(d, v.journal.head * (64 << 10) % (1 << 20), b"x" * 512)
    v.close()
    v = Volume.open(path)
    d = v.lookup("d")
    start = v.journal.start_off
    assert start > 0
    v.write(d, 640 << 10, b"1" * 4096)
    v.write(d, 640 << 10, b"2" * 4096)      # an overwrite: no transaction
    v.write(d, 704 << 10, b"3" * 4096)      # wraps the ring
    assert v.journal.start_off < start
    gen = v.journal.sb_gen
    v.f.close()
    newest = JSB_A if gen % 2 else JSB_B
    _flip(path, newest * mb.META + 100)
    for _ in range(2):
        with Volume.open(path) as v:
            d = v.lookup("d")
            assert v.read_bytes(d, 640 << 10, 4096) == b"2" * 4096
            assert v.read_bytes(d, 704 << 10, 4096) == b"3" * 4096
        rep = check_volume(path)
        assert not ({p.code for p in rep.problems} - {"bad-checksum"}), rep.problems


@pytest.mark.parametrize("seed", range(40))
def test_a_flipped_byte_in_the_ring_never_gives_wrong_data_silently(tmp_path, seed):
    rng = random.Random(seed)
    writes = [(bytes([65 + i]) * 4096, rng.randrange(16) * (64 << 10) + 4096 * rng.randrange(4))
              for i in range(6)]
    path, geom, _ = _unclean_volume(tmp_path, writes)
    model = bytearray(1 << 20)
    for data, off in writes:
        model[off:off + len(data)] = data
    txns = _ring_txns(path, geom)
    lo = min(o for o, _, _ in txns)
    hi = max(o + n + 2 for o, _, n in txns)
    _flip(path, (JOURNAL_START + rng.randrange(lo, hi)) * mb.META + rng.randrange(mb.META),
          1 << rng.randrange(8))
    try:
        v = Volume.open(path)
    except StorageError as e:
        assert "check" in str(e)
        assert not check_volume(path).clean
        return
    with v:
        assert v.read_bytes(v.lookup("d"), 0, 1 << 20) == bytes(model)


def test_a_reset_journal_starts_above_every_generation_in_place(tmp_path):
    # both journal superblocks lost: repair restarts the ring, and the
    # transactions after it must not look older than the metadata in place
    path, geom, _ = _unclean_volume(tmp_path, [(b"A" * 4096, 0), (b"B" * 4096, 64 << 10)])
    with Volume.open(path) as v:
        v.write(v.lookup("d"), 128 << 10, b"C" * 4096)
    _flip(path, JSB_A * mb.META + 100)
    _flip(path, JSB_B * mb.META + 100)
    with pytest.raises(StorageError, match="both journal superblocks"):
        Volume.open(path)
    check_volume(path, repair=True)
    v = Volume.open(path)
    d = v.lookup("d")
    v.write(d, 192 << 10, b"D" * 4096)
    v.write(d, 256 << 10, b"E" * 4096)
    v.f.close()  # no checkpoint: the next open replays
    with Volume.open(path) as v:
        d = v.lookup("d")
        for i, c in enumerate(b"ABCDE"):
            assert v.read_bytes(d, i * (64 << 10), 4096) == bytes([c]) * 4096
    assert check_volume(path).clean
