"""RawFileBackend: aligned and unaligned I/O, O_DIRECT fallback, bounds."""
from __future__ import annotations

import mmap
import os

import pytest

from hvkit.storage.backend import BlockBackend, StorageError
from hvkit.storage.raw import RawFileBackend

SIZE = 4 << 20


@pytest.fixture(params=["tmp", "shm"])
def image(request, tmp_path):
    """An image on a disk file system (O_DIRECT) and on tmpfs (no O_DIRECT)."""
    if request.param == "tmp":
        path = tmp_path / "disk.img"
    else:
        if not os.path.isdir("/dev/shm"):
            pytest.skip("no /dev/shm here")
        path = f"/dev/shm/hvkit-raw-{os.getpid()}-{id(request)}.img"
    b = RawFileBackend.create(path, SIZE)
    yield b
    b.close()
    os.unlink(path)


def test_is_a_block_backend(image):
    assert isinstance(image, BlockBackend)
    assert image.size == SIZE
    assert image.block_size == 512


def test_aligned_round_trip_from_mmap_memory(image):
    buf = mmap.mmap(-1, 8192)
    view = memoryview(buf)
    view[:] = bytes(range(256)) * 32
    image.write(4096, view)
    out = mmap.mmap(-1, 8192)
    image.readinto(4096, memoryview(out))
    assert out[:] == buf[:]
    with open(image.path, "rb") as f:
        f.seek(4096)
        assert f.read(8192) == buf[:]


def test_unaligned_write_keeps_neighbours(image):
    image.write(0, b"\xaa" * 4096)
    image.write(100, b"hello")          # bytes object, odd offset and length
    out = bytearray(4096)
    image.readinto(0, memoryview(out))
    assert out[:100] == b"\xaa" * 100
    assert out[100:105] == b"hello"
    assert out[105:] == b"\xaa" * (4096 - 105)


def test_unaligned_buffer_address(image):
    data = os.urandom(4096)
    image.write(8192, data)
    backing = mmap.mmap(-1, 8192)
    view = memoryview(backing)[512 + 3:512 + 3 + 4096]   # misaligned address
    image.readinto(8192, view)
    assert bytes(view) == data


def test_large_unaligned_crosses_bounce_chunks(image):
    data = os.urandom(600 * 1024 * 2 + 77)
    image.write(1001, data)
    out = bytearray(len(data))
    image.readinto(1001, memoryview(out))
    assert bytes(out) == data


def test_write_zeroes_and_discard(image):
    image.write(0, b"\x11" * 16384)
    image.write_zeroes(4096, 4096)
    image.write_zeroes(100, 10)
    out = bytearray(16384)
    image.readinto(0, memoryview(out))
    assert out[:100] == b"\x11" * 100
    assert out[100:110] == bytes(10)
    assert out[110:4096] == b"\x11" * (4096 - 110)
    assert out[4096:8192] == bytes(4096)
    assert out[8192:] == b"\x11" * 8192
    image.discard(8192, 4096)          # advisory: must not fail, range stays in bounds
    image.flush()


def test_out_of_range_is_refused(image):
    with pytest.raises(StorageError):
        image.readinto(SIZE - 512, memoryview(bytearray(1024)))
    with pytest.raises(StorageError):
        image.write(-512, b"x" * 512)
    with pytest.raises(StorageError):
        image.write_zeroes(SIZE, 512)


def test_read_only(tmp_path):
    path = tmp_path / "ro.img"
    RawFileBackend.create(path, 4096).close()
    ro = RawFileBackend(path, read_only=True)
    try:
        with pytest.raises(StorageError):
            ro.write(0, b"x" * 512)
        out = bytearray(512)
        ro.readinto(0, memoryview(out))
        assert out == bytes(512)
    finally:
        ro.close()


def test_tmpfs_falls_back_with_a_note():
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm here")
    path = f"/dev/shm/hvkit-raw-note-{os.getpid()}.img"
    b = RawFileBackend.create(path, 4096)
    try:
        if b.direct:
            pytest.skip("this tmpfs accepts O_DIRECT")
        assert "O_DIRECT" in b.note
    finally:
        b.close()
        os.unlink(path)


def test_spec_reopens_same_disk(tmp_path):
    b = RawFileBackend.create(tmp_path / "s.img", 8192)
    b.write(0, b"z" * 512)
    target, kwargs = b.spec()
    module, _, name = target.partition(":")
    import importlib
    other = getattr(importlib.import_module(module), name)(**kwargs)
    out = bytearray(512)
    other.readinto(0, memoryview(out))
    assert out == b"z" * 512
    other.close()
    b.close()


def test_size_must_hold_a_block(tmp_path):
    path = tmp_path / "tiny.img"
    path.write_bytes(b"x" * 100)
    with pytest.raises(StorageError):
        RawFileBackend(path)
