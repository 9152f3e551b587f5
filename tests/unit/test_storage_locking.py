"""One writer per volume across processes: a second writer is refused with
the holder's PID, readers share."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from hvkit.storage.backend import StorageError
from hvkit.storage.check import check_volume
from hvkit.storage.superblock import Geometry
from hvkit.storage.volume import Volume


@pytest.fixture
def path(tmp_path):
    p = str(tmp_path / "v.vol")
    with Volume.create(p, Geometry.for_capacity(4 << 20, block_size=64 << 10,
                                               sub_block_size=8 << 10,
                                               journal_size=64 << 10)) as v:
        v.create_file("d", 1 << 20)
    return p


def hold(path: str, read_only: bool) -> subprocess.Popen:
    """Another process that opens the volume and waits."""
    code = ("import sys; from hvkit.storage.volume import Volume; from hvkit.storage.hostfile "
            "import HostFile; p = sys.argv[1]; "
            "v = Volume.open(p, host=HostFile(p, read_only=True)) if sys.argv[2] == '1' "
            "else Volume.open(p); print('open', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, path, "1" if read_only else "0"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "open\n"
    return proc


def release(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    proc.wait(timeout=30)


def test_a_second_writer_is_refused_with_the_holders_pid(path):
    proc = hold(path, read_only=False)
    try:
        with pytest.raises(StorageError, match=f"in use by PID {proc.pid}"):
            Volume.open(path)
        with pytest.raises(StorageError, match="in use"):
            check_volume(path)
        from hvkit.storage.hostfile import HostFile
        with pytest.raises(StorageError, match="in use"):
            HostFile(path, read_only=True)
    finally:
        release(proc)
    with Volume.open(path) as v:  # free again once the holder is gone
        v.write(v.lookup("d"), 0, b"x")


def test_readers_share_and_keep_writers_out(path):
    from hvkit.storage.hostfile import HostFile
    proc = hold(path, read_only=True)
    try:
        f = HostFile(path, read_only=True)
        f.close()
        with pytest.raises(StorageError, match=f"in use by PID {proc.pid}"):
            Volume.open(path)
    finally:
        release(proc)


def test_a_killed_writer_leaves_no_lock_behind(path):
    proc = hold(path, read_only=False)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with Volume.open(path) as v:
        assert v.lookup("d") == 0


def test_two_opens_in_one_process_are_refused_too(path):
    with Volume.open(path):
        with pytest.raises(StorageError, match=f"in use by PID {os.getpid()}"):
            Volume.open(path)
