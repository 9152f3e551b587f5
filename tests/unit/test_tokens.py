"""Token-checked storage I/O: every refusal, the edges of an area, and a
property test over random areas and requests."""
from __future__ import annotations

import array

import pytest
from hypothesis import assume, given, settings, strategies as st

from hvkit.storage.backend import BlockBackend
from hvkit.storage.guard import AccessDenied
from hvkit.storage.superblock import Geometry
from hvkit.storage.guard import make_io_pair
from hvkit.storage.tokens import EpochTable, IOControl, Token, TokenError
from hvkit.storage.vdisk import VirtualDisk
from hvkit.storage.volume import Volume

DISK = 1 << 20
LBA = 512


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000_000_000

    def __call__(self) -> int:
        return self.now


class RecordingDisk:
    """A real in-memory backend that remembers every call it served."""

    def __init__(self) -> None:
        self.data = bytearray(DISK)
        self.size, self.block_size, self.read_only = DISK, LBA, False
        self.calls: list[str] = []

    def readinto(self, offset, buf):
        self.calls.append("read")
        buf[:] = self.data[offset:offset + len(buf)]

    def write(self, offset, data):
        self.calls.append("write")
        self.data[offset:offset + len(data)] = data

    def flush(self):
        self.calls.append("flush")

    def write_zeroes(self, offset, length):
        self.calls.append("write_zeroes")
        self.data[offset:offset + length] = bytes(length)

    def discard(self, offset, length):
        self.calls.append("discard")

    def close(self):
        pass


@pytest.fixture
def env():
    clock = Clock()
    control, part = make_io_pair(clock)
    disk = RecordingDisk()
    part.register_disk("d0", disk)
    part.register_disk("d1", RecordingDisk())
    return control, part, disk, clock


def denied(part, disk, fn, reason):
    before = len(part.audit)
    calls = list(disk.calls)
    with pytest.raises(AccessDenied, match=reason):
        fn()
    assert disk.calls == calls, "a refused request reached the backend"
    assert len(part.audit) == before + 1
    assert reason.split()[0].lower() in part.audit[-1].reason.lower()


def test_guarded_backend_is_a_block_backend_and_serves_granted_io(env):
    control, part, disk, _ = env
    g = part.bind("d0", "vm1", control.issue("vm1", "d0", 8, 16))
    assert isinstance(g, BlockBackend) and g.size == DISK
    g.write(8 * LBA, b"hi")
    buf = bytearray(2)
    g.readinto(8 * LBA, memoryview(buf))
    g.flush()
    assert buf == b"hi" and disk.calls == ["write", "read", "flush"]


def test_valid_at_both_edges_of_the_area(env):
    control, part, disk, _ = env
    g = part.bind("d0", "vm1", control.issue("vm1", "d0", 8, 16))
    g.write(8 * LBA, b"a" * LBA)              # first byte of the area
    g.write(24 * LBA - 1, b"z")               # last byte
    g.readinto(8 * LBA, memoryview(bytearray(16 * LBA)))  # the whole area
    g.write_zeroes(8 * LBA, 16 * LBA)
    assert disk.calls == ["write", "write", "read", "write_zeroes"]


@pytest.mark.parametrize("offset, length", [
    (8 * LBA - 1, 1),          # one byte before
    (24 * LBA, 1),             # one byte after
    (24 * LBA - 1, 2),         # straddles the end
    (8 * LBA - 1, 2),          # straddles the start
    (0, DISK),                 # the whole disk
])
def test_outside_the_area_is_refused(env, offset, length):
    control, part, disk, _ = env
    g = part.bind("d0", "vm1", control.issue("vm1", "d0", 8, 16))
    denied(part, disk, lambda: g.write(offset, b"x" * length), "outside the token's area")
    denied(part, disk, lambda: g.readinto(offset, memoryview(bytearray(length))),
           "outside the token's area")


def test_another_software_id_is_refused(env):
    control, part, disk, _ = env
    stolen = part.bind("d0", "vm2", control.issue("vm1", "d0", 0, 16))
    denied(part, disk, lambda: stolen.write(0, b"x"), "another software ID")


def test_token_for_another_disk_is_refused(env):
    control, part, disk, _ = env
    g = part.bind("d0", "vm1", control.issue("vm1", "d1", 0, 16))
    denied(part, disk, lambda: g.write(0, b"x"), "another disk")


def test_forged_token_is_refused(env):
    control, part, disk, _ = env
    good = control.issue("vm1", "d0", 0, 16, "r")
    tok = Token.decode(good)
    # widen the area and grant write, keeping the old MAC
    forged = Token(tok.software_id, tok.disk_id, 0, DISK // LBA, 3, tok.expires_ns,
                   tok.epoch, tok.nonce, tok.mac).encode()
    denied(part, disk, lambda: part.bind("d0", "vm1", forged).write(0, b"x"), "forged")
    flipped = bytearray(good)
    flipped[-1] ^= 1
    denied(part, disk, lambda: part.bind("d0", "vm1", bytes(flipped)).readinto(
        0, memoryview(bytearray(1))), "forged")
    other_key = IOControl(b"k" * 32, EpochTable(), part._clock).issue("vm1", "d0", 0, 16)
    denied(part, disk, lambda: part.bind("d0", "vm1", other_key).write(0, b"x"), "forged")


def test_malformed_token_is_refused(env):
    _, part, disk, _ = env
    denied(part, disk, lambda: part.bind("d0", "vm1", b"junk").write(0, b"x"), "malformed")


def test_expired_token_is_refused(env):
    control, part, disk, clock = env
    g = part.bind("d0", "vm1", control.issue("vm1", "d0", 0, 16, ttl=10))
    g.write(0, b"x")
    clock.now += 10 * 10**9
    denied(part, disk, lambda: g.write(0, b"x"), "expired")


def test_revoked_token_is_refused_and_a_new_one_works(env):
    control, part, disk, _ = env
    g = part.bind("d0", "vm1", control.issue("vm1", "d0", 0, 16))
    other = part.bind("d1", "vm1", control.issue("vm1", "d1", 0, 16))
    assert control.revoke_disk("d0") == 1
    denied(part, disk, lambda: g.write(0, b"x"), "revoked")
    other.write(0, b"x")  # revocation is per disk
    g.rebind(control.issue("vm1", "d0", 0, 16))
    g.write(0, b"x")


def test_missing_right_is_refused(env):
    control, part, disk, _ = env
    ro = part.bind("d0", "vm1", control.issue("vm1", "d0", 0, 16, "r"))
    ro.readinto(0, memoryview(bytearray(1)))
    denied(part, disk, lambda: ro.write(0, b"x"), "no write right")
    denied(part, disk, lambda: ro.flush(), "no write right")
    denied(part, disk, lambda: ro.discard(0, LBA), "no write right")
    wo = part.bind("d0", "vm1", control.issue("vm1", "d0", 0, 16, "w"))
    denied(part, disk, lambda: wo.readinto(0, memoryview(bytearray(1))), "no read right")


def test_scatter_gather_is_refused_whole_if_one_element_is_outside(env):
    control, part, disk, _ = env
    g = part.bind("d0", "vm1", control.issue("vm1", "d0", 0, 16))
    denied(part, disk, lambda: g.write_sg([(b"a", 0), (b"b", 16 * LBA)]), "outside")


def test_audit_record_names_who_what_and_why(env):
    control, part, disk, _ = env
    g = part.bind("d0", "vm9", control.issue("vm9", "d0", 0, 1))
    with pytest.raises(AccessDenied) as ei:
        g.write(4096, b"x" * 100)
    rec = part.audit[-1]
    assert (rec.software_id, rec.disk_id, rec.op, rec.offset, rec.length) == \
        ("vm9", "d0", "write", 4096, 100)
    assert "vm9" in str(ei.value) and "refused" in str(ei.value)


@pytest.mark.parametrize("kw, match", [
    (dict(lba_count=0), "not a valid LBA range"),
    (dict(rights="x"), "rights 'x'"),
    (dict(ttl=0), "lifetime"),
    (dict(software_id=""), "software ID must be"),
])
def test_bad_issue_requests_are_refused(env, kw, match):
    control = env[0]
    args = dict(software_id="vm1", disk_id="d0", lba_start=0, lba_count=8, rights="rw", ttl=5)
    args.update(kw)
    with pytest.raises(TokenError, match=match):
        control.issue(**args)


def test_guard_over_a_block_file_disk(tmp_path):
    path = str(tmp_path / "v.vol")
    with Volume.create(path, Geometry.for_capacity(4 << 20, block_size=64 << 10,
                                                   sub_block_size=8 << 10)) as v:
        v.create_file("d", 1 << 20)
    control, part = make_io_pair()
    disk = VirtualDisk.open(path, "d")
    part.register_disk("vol/d", disk)
    g = part.bind("vol/d", "vm1", control.issue("vm1", "vol/d", 128, 128))
    g.write_sg([(b"a" * 512, 128 * 512), (b"b" * 512, 200 * 512)])
    with pytest.raises(AccessDenied):
        g.write(0, b"x")
    assert disk.volume.read_bytes(disk.index, 0, 1) == b"\0"
    assert disk.volume.read_bytes(disk.index, 200 * 512, 1) == b"b"
    disk.close()


_clock = Clock()
_control, _part = make_io_pair(_clock)
_disk = RecordingDisk()
_part.register_disk("p", _disk)


@settings(max_examples=400, deadline=None)
@given(start=st.integers(0, DISK // LBA - 1), count=st.integers(1, DISK // LBA),
       offset=st.integers(0, DISK), length=st.integers(0, 3 * LBA),
       same_id=st.booleans(), write=st.booleans())
def test_property_allowed_iff_inside_area_and_same_id(start, count, offset, length,
                                                      same_id, write):
    assume(offset + length <= DISK)
    tok = _control.issue("vm", "p", start, count, "rw")
    g = _part.bind("p", "vm" if same_id else "intruder", tok)
    lo, hi = start * LBA, (start + count) * LBA
    allowed = same_id and lo <= offset and offset + length <= hi
    served = len(_disk.calls)
    try:
        if write:
            g.write(offset, b"w" * length)
        else:
            g.readinto(offset, memoryview(bytearray(length)))
        ok = True
    except AccessDenied:
        ok = False
    assert ok == allowed
    assert (len(_disk.calls) > served) == allowed


# -- lengths are bytes, whatever the buffer's item size --------------------------

class ByteDisk(RecordingDisk):
    """Serves requests by byte length, as real backends do."""

    def readinto(self, offset, buf):
        mv = memoryview(buf).cast("B")
        self.calls.append("read")
        mv[:] = self.data[offset:offset + mv.nbytes]

    def write(self, offset, data):
        mv = memoryview(data).cast("B")
        self.calls.append("write")
        self.data[offset:offset + mv.nbytes] = mv


@pytest.fixture
def byte_env():
    control, part = make_io_pair(Clock())
    disk = ByteDisk()
    part.register_disk("d0", disk)
    return control, part, disk


def test_a_typed_buffer_cannot_reach_past_the_area(byte_env):
    control, part, disk = byte_env
    g = part.bind("d0", "vm1", control.issue("vm1", "d0", 0, 16))
    hi = 16 * LBA
    words = memoryview(array.array("Q", [0x4141414141414141] * 64))  # 64 items, 512 bytes
    denied(part, disk, lambda: g.write(hi - 64, words), "outside the token's area")
    out = memoryview(array.array("Q", [0] * 64))
    denied(part, disk, lambda: g.readinto(hi - 64, out), "outside the token's area")
    denied(part, disk, lambda: g.write_sg([(words, hi - 64)]), "outside the token's area")
    assert disk.data[hi:] == bytes(DISK - hi)


def test_an_empty_scatter_gather_array_is_checked_and_audited(byte_env):
    control, part, disk = byte_env
    bad = part.bind("d0", "vm1", b"\0" * 80)
    denied(part, disk, lambda: bad.write_sg([]), "malformed token")
    ro = part.bind("d0", "vm1", control.issue("vm1", "d0", 0, 16, "r"))
    denied(part, disk, lambda: ro.write_sg([]), "no write right")
    good = part.bind("d0", "vm1", control.issue("vm1", "d0", 4, 16))
    accepted = part.accepted
    good.write_sg([])
    assert part.accepted == accepted + 1


_bcontrol, _bpart = make_io_pair(_clock)
_bdisk = ByteDisk()
_bpart.register_disk("b", _bdisk)


@settings(max_examples=300, deadline=None)
@given(code=st.sampled_from("bBhHiIlLqQfd"), items=st.integers(0, 300),
       offset=st.integers(0, DISK - 4096), start=st.integers(0, 64), count=st.integers(1, 64),
       how=st.sampled_from(["write", "read", "write_sg"]))
def test_property_every_item_size_is_checked_in_bytes(code, items, offset, start, count, how):
    tok = _bcontrol.issue("vm", "b", start, count, "rw")
    g = _bpart.bind("b", "vm", tok)
    buf = memoryview(array.array(code, bytes(items * array.array(code).itemsize)))
    lo, hi = start * LBA, (start + count) * LBA
    allowed = lo <= offset and offset + buf.nbytes <= hi
    try:
        if how == "write":
            g.write(offset, buf)
        elif how == "read":
            g.readinto(offset, buf)
        else:
            g.write_sg([(buf, offset)])
        ok = True
    except AccessDenied:
        ok = False
    assert ok == allowed
