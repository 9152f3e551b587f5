import struct

import pytest

from hvkit.boot.elf import parse_elf
from hvkit.errors import GuestLoadError
from hvkit.memory.guest import GuestMemory


def make_elf(*, cls=2, machine=62, etype=2, entry=0x100000, paddr=0x100000,
             code=b"\xf4", memsz=None, extra_ph=()):
    """A minimal ELF64 executable with one PT_LOAD segment."""
    phs = [(1, 5, 0x1000, paddr, paddr, len(code), memsz or len(code), 0x1000)] + list(extra_ph)
    ehdr = struct.pack("<4sBBBBB7sHHIQQQIHHHHHH", b"\x7fELF", cls, 1, 1, 0, 0, bytes(7),
                       etype, machine, 1, entry, 64, 0, 0, 64, 56, len(phs), 64, 0, 0)
    ph = b"".join(struct.pack("<IIQQQQQQ", *p) for p in phs)
    blob = bytearray(ehdr + ph)
    blob += bytes(0x1000 - len(blob))
    blob += code
    return bytes(blob)


def test_loads_segments_and_bss():
    data = make_elf(code=b"\x90\x90\xf4", memsz=0x2000)
    img = parse_elf("t.elf", data)
    assert img.entry == 0x100000 and img.end == 0x102000
    with GuestMemory.create(4 << 20) as mem:
        mem.write(0x100003, b"\xaa")          # stale byte in bss must be cleared
        img.load(mem)
        assert mem.read(0x100000, 4) == b"\x90\x90\xf4\x00"


@pytest.mark.parametrize("kw,msg", [
    (dict(cls=1), "32-bit ELF"),
    (dict(machine=183), "not x86-64"),
    (dict(etype=3), "ET_EXEC"),
    (dict(entry=0x200000), "entry point"),
])
def test_unsupported_elfs_are_named(kw, msg):
    with pytest.raises(GuestLoadError, match=msg):
        parse_elf("bad.elf", make_elf(**kw))


def test_not_elf_and_truncated():
    with pytest.raises(GuestLoadError, match="not an ELF"):
        parse_elf("x", b"MZ\x90\x00")
    with pytest.raises(GuestLoadError):
        parse_elf("x", make_elf()[:80])


def test_overlapping_segments_refused():
    extra = [(1, 5, 0x1000, 0x100000, 0x100000, 1, 1, 0x1000)]
    with pytest.raises(GuestLoadError, match="overlap"):
        parse_elf("x", make_elf(extra_ph=extra))


def test_guest_that_does_not_fit():
    img = parse_elf("big.elf", make_elf(memsz=8 << 20))
    with pytest.raises(GuestLoadError, match="needs guest RAM up to"):
        img.check_fits(4 << 20)
    low = parse_elf("low.elf", make_elf(paddr=0x1000, entry=0x1000))
    with pytest.raises(GuestLoadError, match="boot area"):
        low.check_fits(4 << 20, reserved_below=0x100000)


def test_missing_file():
    with pytest.raises(GuestLoadError, match="cannot read"):
        parse_elf("/nonexistent/guest.elf")


def test_bundled_guests_parse():
    from hvkit import guests
    names = guests.available()
    assert {"hello", "smp", "echo", "crash"} <= set(names)
    for name in names:
        img = parse_elf(guests.path(name))
        assert img.start >= 0x100000
