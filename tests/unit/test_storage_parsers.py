"""Property tests for every parser of volume and token data: whatever the
bytes, a parser returns a checked value or raises the storage error that
names the damage, never anything else (struct.error, UnicodeDecodeError,
IndexError) and never a value outside the volume."""
from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from hvkit.storage import blockmap as bm
from hvkit.storage import metablock as mb
from hvkit.storage.backend import StorageError
from hvkit.storage.hostfile import HostFile
from hvkit.storage.journal import Journal, read_jsb
from hvkit.storage.superblock import JOURNAL_START, JSB_A, Geometry
from hvkit.storage.guard import make_io_pair
from hvkit.storage.tokens import Token, TokenError
from hvkit.storage.volume import Volume

GEOM = Geometry.for_capacity(1 << 20, block_size=64 << 10, sub_block_size=8 << 10,
                             journal_size=64 << 10)

block = st.binary(min_size=mb.META, max_size=mb.META)


def mutated(valid: bytes):
    """A valid block with a few bytes changed (and maybe resealed)."""
    return st.tuples(st.lists(st.tuples(st.integers(0, mb.META - 1), st.integers(0, 255)),
                              min_size=1, max_size=8), st.booleans()).map(
        lambda t: _mutate(valid, *t))


def _mutate(valid: bytes, edits, reseal: bool) -> bytes:
    buf = bytearray(valid)
    for off, val in edits:
        buf[off] = val
    return bytes(mb.seal(buf)) if reseal else bytes(buf)


settings.register_profile("parsers", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                 HealthCheck.large_base_example,
                                                 HealthCheck.too_slow])
settings.load_profile("parsers")


@given(st.one_of(block, mutated(bytes(GEOM.encode(0)))))
def test_superblock_decode(raw):
    try:
        g = Geometry.decode(raw, 0)
    except mb.CorruptMetadata:
        return
    assert g.block_size >= 8192 and g.n_blocks >= 1 and g.journal_blocks >= 16


def _desc_block() -> bytes:
    buf = mb.new_block(mb.KIND_DESC, 7)
    bm.write_desc(buf, in_use=True, name="disk", size=5 << 20, created_ns=1)
    bm.set_u64(buf, bm.slot_offset(0), bm.make_ptr(bm.PK_BLOCK, 3))
    return bytes(mb.seal(buf))


@given(st.one_of(block, mutated(_desc_block())))
def test_descriptor_and_pointers(raw):
    try:
        mb.verify(raw, mb.KIND_DESC, 7)
        info = bm.read_desc(raw, 7)
    except mb.CorruptMetadata:
        return
    assert len(info.name.encode()) <= bm.NAME_MAX
    for slot in range(bm.N_SLOTS):
        p = bm.get_u64(raw, bm.slot_offset(slot))
        if p:
            try:
                kind, unit = bm.decode_ptr(p, GEOM)
            except bm.PointerOutOfRange:
                continue
            assert unit < GEOM.resource_count(bm.resource_of(kind))


@given(st.binary(max_size=400))
def test_token_decode(raw):
    try:
        tok = Token.decode(raw)
    except TokenError:
        return
    assert tok.encode() == raw


def test_token_decode_of_mutated_tokens_never_escapes():
    control, _ = make_io_pair()
    good = control.issue("vm", "d", 0, 8)

    @given(st.lists(st.tuples(st.integers(0, len(good) - 1), st.integers(0, 255)),
                    max_size=6), st.integers(-3, 3))
    def check(edits, cut):
        raw = bytearray(good)
        for off, val in edits:
            raw[off] = val
        raw = raw[:len(raw) + cut] if cut < 0 else raw + bytes(cut)
        try:
            Token.decode(bytes(raw))
        except TokenError:
            pass
    check()


@pytest.fixture(scope="module")
def ring_volume(tmp_path_factory):
    """A volume with a few committed transactions left in its ring."""
    path = str(tmp_path_factory.mktemp("ring") / "v.vol")
    v = Volume.create(path, GEOM)
    d = v.create_file("d", 1 << 20)
    v.journal.checkpoint()
    for i in range(3):
        v.write(d, i * (128 << 10), bytes([i + 1]) * 4096)
    v.f.close()
    with open(path, "rb") as fh:
        return path, fh.read()


@given(edits=st.lists(st.tuples(st.integers(0, GEOM.journal_blocks * mb.META - 1),
                                st.integers(0, 255)), min_size=1, max_size=6),
       jsb=st.booleans())
def test_journal_scan_of_a_damaged_ring(ring_volume, tmp_path_factory, edits, jsb):
    path, image = ring_volume
    raw = bytearray(image)
    for off, val in edits:
        base = JSB_A * mb.META if jsb and off < mb.META else JOURNAL_START * mb.META
        raw[base + off] = val
    copy = str(tmp_path_factory.mktemp("scan") / "v.vol")
    with open(copy, "wb") as fh:
        fh.write(raw)
    f = HostFile(copy, read_only=True)
    try:
        problems, best = read_jsb(f)
        if best is None:
            return
        try:
            res = Journal(f, GEOM).scan()
        except StorageError:
            return
        seqs = [t.seq for t in res.txns]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        for t in res.txns:
            for target, img in t.images:
                assert GEOM.bitmap_start(0) <= target < GEOM.meta_end
                assert mb.header(img)[5] == target and len(img) == mb.META
    finally:
        f.close()


@given(st.binary(min_size=0, max_size=3 * mb.META))
def test_verify_of_any_bytes(raw):
    try:
        mb.verify(raw, mb.KIND_PTR, 9)
    except mb.CorruptMetadata:
        return
    assert len(raw) >= mb.META and struct.unpack_from("<Q", raw, 16)[0] == 9


@pytest.fixture(scope="module")
def used_volume(tmp_path_factory):
    """A checkpointed volume with data in direct and indirect blocks."""
    path = str(tmp_path_factory.mktemp("used") / "v.vol")
    g = Geometry.for_capacity(4 << 20, block_size=64 << 10, sub_block_size=8 << 10,
                              max_files=4, journal_size=64 << 10)
    with Volume.create(path, g) as v:
        a = v.create_file("a", 40 << 20)
        v.write_sg(a, [(bytes([i + 1]) * 4096, i * (64 << 10)) for i in range(4)])
        v.write(a, 600 * (64 << 10), b"far")
        b = v.create_file("b", (64 << 10) + 100)
        v.write(b, 0, b"B" * ((64 << 10) + 100))
    with open(path, "rb") as fh:
        return path, g, fh.read()


@settings(max_examples=60)
@given(edits=st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(0, 255)),
                      min_size=1, max_size=4))
def test_check_and_repair_of_damaged_metadata(used_volume, tmp_path_factory, edits):
    from hvkit.storage.check import EXIT_UNCORRECTED, check_volume
    path, g, image = used_volume
    raw = bytearray(image)
    # bitmaps, descriptors and the first pointer blocks: where the used metadata is
    lo, hi = g.bitmap_start(0) * mb.META, (g.ptr_start + 4) * mb.META
    for off, val in edits:
        raw[lo + off % (hi - lo)] = val
    copy = str(tmp_path_factory.mktemp("chk") / "v.vol")
    with open(copy, "wb") as fh:
        fh.write(raw)
    rep = check_volume(copy)
    rep = check_volume(copy, repair=True)
    after = check_volume(copy)
    assert after.clean or after.exit_code(False) == EXIT_UNCORRECTED
    if rep.exit_code(True) != EXIT_UNCORRECTED and not rep.fatal:
        assert after.clean, [str(p) for p in after.problems]
        with Volume.open(copy) as v:  # a repaired volume opens and reads
            for f in v.files():
                v.read_bytes(f.index, 0, min(f.size, 1 << 16))
