"""Crash-consistency trials for block-file volumes, shared by the unit
tests and ``tests/stress/blockfile_crash.py``.

``kill_trial``: a forked child writes random scatter-gather arrays and
acknowledges each on a pipe after ``write_sg`` returned (after its
commit); the parent SIGKILLs it at a random moment. ``power_cut_trial``:
the same workload in-process on a ``CrashSimFile`` that fails at a random
operation and then keeps a random, reordered, possibly torn subset of the
unflushed writes. After each: ``check`` must be clean, every acknowledged
array must read back exactly, and each element of the unacknowledged
array must read back, sector by sector, as old or new data: never as
stale or foreign bytes. ``flip_trial``: a SIGKILL trial followed by one
flipped bit in the journal ring: the volume reads back every acknowledged
array, or refuses to open and ``check`` reports the damage. New blocks of an unacknowledged array are all or
nothing per transaction; overwrites of mapped blocks go straight to their
place (they need no transaction), so an interrupted array can be partly
applied, as in any ordered-mode file system.
"""
from __future__ import annotations

import os
import random
import signal
import struct
import time
from dataclasses import dataclass

from hvkit.storage.backend import StorageError
from hvkit.storage.check import check_volume
from hvkit.storage.faults import SECTOR, CrashSimFile, SimulatedCrash
from hvkit.storage.superblock import JOURNAL_START, Geometry
from hvkit.storage.volume import Volume

DISK = "crash"
#: a disk that does not end on a block boundary, so its tail is a sub-block
DISK_SIZE = (1 << 20) + (48 << 10) + 4096


def small_geometry() -> Geometry:
    return Geometry.for_capacity(2 << 20, block_size=64 << 10, sub_block_size=8 << 10,
                                 max_files=2, journal_size=96 << 10)


def make_arrays(seed: int, count: int, size: int = DISK_SIZE) -> list[list[tuple[bytes, int]]]:
    """Random arrays of non-overlapping, sector-aligned elements."""
    rng = random.Random(seed)
    arrays = []
    for a in range(count):
        taken: list[tuple[int, int]] = []
        arr = []
        for _ in range(rng.randint(1, 12)):
            length = rng.choice((SECTOR, 4096, 4096, 8192, 3 * SECTOR, 20 << 10))
            off = rng.randrange(0, (size - length) // SECTOR + 1) * SECTOR
            if any(off < e and s < off + length for s, e in taken):
                continue
            taken.append((off, off + length))
            fill = struct.pack("<II", a, len(arr)) * (length // 8)
            arr.append((fill, off))
        arrays.append(arr)
    return arrays


@dataclass
class TrialResult:
    acked: int
    problems: list[str]
    replayed: int


def _verify(path: str, arrays, acked: int, inflight: int | None, sector_tear: bool) -> TrialResult:
    rep = check_volume(path)
    problems = [str(p) for p in rep.problems]
    rep2 = check_volume(path)  # the replay happened in the first pass
    problems += [f"second pass: {p}" for p in rep2.problems]
    model = bytearray(DISK_SIZE)
    for arr in arrays[:acked]:
        for data, off in arr:
            model[off:off + len(data)] = data
    with Volume.open(path) as vol:
        got = vol.read_bytes(vol.lookup(DISK), 0, DISK_SIZE)
    expect = bytearray(model)
    if inflight is not None and inflight < len(arrays):
        for data, off in arrays[inflight]:
            seg = got[off:off + len(data)]
            old = bytes(model[off:off + len(data)])
            if seg == data or seg == old:
                expect[off:off + len(data)] = seg
                continue
            if sector_tear and all(
                    seg[i:i + SECTOR] in (data[i:i + SECTOR], old[i:i + SECTOR])
                    for i in range(0, len(data), SECTOR)):
                expect[off:off + len(data)] = seg
                continue
            problems.append(f"unacknowledged element at {off} ({len(data)} bytes) is "
                            f"visible in part")
    if got != bytes(expect):
        bad = next(i for i in range(DISK_SIZE) if got[i] != expect[i])
        problems.append(f"data differs from the acknowledged writes at byte {bad}")
    return TrialResult(acked, problems, rep.replayed)


def _child(path: str, arrays, wfd: int) -> None:
    try:
        vol = Volume.open(path)
        fidx = vol.lookup(DISK)
        for i, arr in enumerate(arrays):
            vol.write_sg(fidx, arr)
            os.write(wfd, struct.pack("<I", i))
        os._exit(0)
    except BaseException:
        os._exit(3)


def _killed(workdir: str, seed: int, max_delay: float, n_arrays: int, tag: str):
    """A fresh small volume whose writer was SIGKILLed mid-stream: the path,
    the arrays, how many were acknowledged, and a failure note (or "")."""
    rng = random.Random(seed)
    path = os.path.join(workdir, f"{tag}-{seed}.vol")
    if os.path.exists(path):
        os.unlink(path)
    arrays = make_arrays(seed, n_arrays)
    with Volume.create(path, small_geometry()) as vol:
        fidx = vol.create_file(DISK, DISK_SIZE)
        # a few acknowledged arrays before the child starts, so overwrites happen
        pre = rng.randint(0, 5)
        for arr in arrays[:pre]:
            vol.write_sg(fidx, arr)
    kill_after = rng.randint(1, 30)
    delay = rng.uniform(0, max_delay)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        _child(path, arrays[pre:], wfd)
    os.close(wfd)
    raw = b""
    while len(raw) < 4 * kill_after:
        chunk = os.read(rfd, 65536)
        if not chunk:
            break  # the child ended on its own
        raw += chunk
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    while chunk := os.read(rfd, 65536):
        raw += chunk
    os.close(rfd)
    acks = [struct.unpack_from("<I", raw, i)[0] for i in range(0, len(raw) - 3, 4)]
    acked = pre + (acks[-1] + 1 if acks else 0)
    failed = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3
    return path, arrays, acked, "child failed before it was killed" if failed else ""


def kill_trial(workdir: str, seed: int, *, max_delay: float = 0.005,
               n_arrays: int = 400) -> TrialResult:
    """One SIGKILL trial in a fresh small volume: the child is killed after
    a random number (1..30) of acknowledged arrays plus a random short wait,
    so every trial crashes mid-stream however loaded the machine is."""
    path, arrays, acked, failed = _killed(workdir, seed, max_delay, n_arrays, "kill")
    if failed:
        return TrialResult(acked, [failed], 0)
    # a killed pwrite can stop between pages, and an element crossing blocks is
    # several pwrites, so unacknowledged elements are judged sector by sector
    res = _verify(path, arrays, acked, acked, sector_tear=True)
    os.unlink(path)
    return res


def flip_trial(workdir: str, seed: int, *, max_delay: float = 0.005,
               n_arrays: int = 400) -> TrialResult:
    """A SIGKILL trial, then one flipped bit in the journal ring: the volume
    must either read back every acknowledged array or refuse to open with
    ``check`` reporting the damage; wrong data is never served silently."""
    path, arrays, acked, failed = _killed(workdir, seed, max_delay, n_arrays, "flip")
    if failed:
        return TrialResult(acked, [failed], 0)
    rng = random.Random(seed ^ 0x5EED)
    geom = small_geometry()
    bit = rng.randrange(geom.journal_blocks * 4096 * 8)
    with open(path, "r+b") as fh:
        fh.seek(JOURNAL_START * 4096 + bit // 8)
        b = fh.read(1)[0]
        fh.seek(JOURNAL_START * 4096 + bit // 8)
        fh.write(bytes([b ^ (1 << bit % 8)]))
    try:
        Volume.open(path).close()
    except StorageError:
        rep = check_volume(path)
        os.unlink(path)
        return TrialResult(acked, [] if not rep.clean else
                           ["open refused, yet check says clean"], 0)
    res = _verify(path, arrays, acked, acked, sector_tear=True)
    os.unlink(path)
    return res


def power_cut_trial(workdir: str, seed: int, *, tear: bool = True,
                    n_arrays: int = 40) -> TrialResult:
    """One simulated power loss at a random operation of the write path."""
    rng = random.Random(seed)
    path = os.path.join(workdir, f"cut-{seed}.vol")
    if os.path.exists(path):
        os.unlink(path)
    arrays = make_arrays(seed, n_arrays)
    with Volume.create(path, small_geometry()) as vol:
        vol.create_file(DISK, DISK_SIZE)
    f = CrashSimFile(path)
    vol = Volume.open(path, host=f)
    fidx = vol.lookup(DISK)
    f.crash_after = rng.randrange(0, 6 * n_arrays)
    acked = 0
    try:
        for arr in arrays:
            vol.write_sg(fidx, arr)
            acked += 1
    except SimulatedCrash:
        pass
    f.power_cut(rng, survive=rng.random(), tear=tear)
    f.close()
    res = _verify(path, arrays, acked, acked, sector_tear=True)
    os.unlink(path)
    return res
