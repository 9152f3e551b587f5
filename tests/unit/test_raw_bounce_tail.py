"""RawFileBackend's bounce buffer at the end of an image whose size is not
a multiple of the O_DIRECT alignment: a read-modify-write of the last
aligned block must not grow the file, or the namespace grows on the next
open and the guest sees a disk of a different size."""
from __future__ import annotations

import os

import pytest

from hvkit.storage.raw import RawFileBackend

BLOCKS = 4 * 4096


def forced_bounce(path) -> RawFileBackend:
    """The backend with a 4 KiB alignment, as on a 4Kn device; on any file
    system (O_DIRECT or not) its unaligned I/O then takes the bounce path."""
    b = RawFileBackend(path)
    b.direct = True
    b.align = 4096
    return b


@pytest.mark.parametrize("extra", [512, 1536, 3584])
def test_writing_the_last_lbas_keeps_the_file_size(tmp_path, extra):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(BLOCKS + extra))
    b = forced_bounce(path)
    try:
        assert b.size == BLOCKS + extra
        data = os.urandom(512)
        b.write(b.size - 512, data)
        assert os.path.getsize(path) == BLOCKS + extra
        out = bytearray(512)
        b.readinto(b.size - 512, memoryview(out))
        assert bytes(out) == data
    finally:
        b.close()
    again = RawFileBackend(path)
    try:
        assert again.size == BLOCKS + extra
    finally:
        again.close()


def test_bytes_past_the_last_whole_block_survive(tmp_path):
    """A file 100 bytes longer than its last whole LBA: those bytes are not
    the disk's, and a write to the last LBA leaves them as they were."""
    path = tmp_path / "disk.img"
    tail = b"T" * 100
    path.write_bytes(bytes(BLOCKS + 512) + tail)
    b = forced_bounce(path)
    try:
        assert b.size == BLOCKS + 512
        b.write(BLOCKS, b"\x5a" * 512)
        b.write(BLOCKS - 700, b"\x33" * 1212)       # across the last aligned boundary
    finally:
        b.close()
    raw = path.read_bytes()
    assert len(raw) == BLOCKS + 512 + 100
    assert raw[-100:] == tail
    assert raw[BLOCKS - 700:BLOCKS + 512] == b"\x33" * 1212
