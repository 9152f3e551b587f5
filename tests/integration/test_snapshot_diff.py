"""Diff snapshots, chains, page providers, prefetch and clones, on a guest
that counts in memory and on the serial line while it is saved."""
import json
import os
import re
import shutil
import time

import pytest

from hvkit import MicroVM
from hvkit.snapshot import SnapshotError
from hvkit.snapshot.pages import FileProvider

pytestmark = pytest.mark.kvm

LINE = re.compile(rb"n=(\d+) sum=(\d+)\n")


def wait_lines(vm, count, timeout=20.0, start=0):
    """The first ``count`` complete counter lines printed after byte ``start``."""
    end = time.monotonic() + timeout
    while True:
        found = LINE.findall(vm.console_output[start:])
        if len(found) >= count:
            return [(int(n), int(s)) for n, s in found[:count]]
        assert time.monotonic() < end, vm.console_output[-300:]
        time.sleep(0.002)


def counter(pages=32):
    vm = MicroVM("counter", args=f"pages={pages} every=50000", memory="64M")
    vm.start()
    wait_lines(vm, 1)
    return vm


def regions(vm):
    return [vm.memory.read(r.gpa, r.size) for r in vm.memory]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A counter saved as base + two diffs, and as a full snapshot at the
    same moment as the last diff."""
    root = tmp_path_factory.mktemp("chain")
    vm = counter()
    try:
        vm.pause()
        vm.snapshot(root / "base", track_dirty=True)
        for name in ("d1", "d2"):
            vm.resume()
            wait_lines(vm, 2, start=len(vm.console_output))
            vm.pause()
            # the host writes guest RAM too (a device, a hypercall result)
            if name == "d2":
                vm.memory.write(0x3F00000, b"written by the host")
            vm.snapshot(root / name, diff=True)
        vm.snapshot(root / "full")
    finally:
        vm.close()
    return root


def test_a_diff_holds_only_the_pages_written_since_its_parent(chain):
    header = json.loads((chain / "d2" / "vm.json").read_text())
    assert header["parent"]["path"] == "../d1"
    pages = sum(c for runs in header["pages"] for _, c in runs)
    # the counter's 32 pages, its stack, the host's page: not the 16384 of RAM
    assert 32 <= pages < 64, header["pages"]
    assert os.stat(chain / "d2" / "memory").st_blocks * 512 <= 64 * 4096
    base = json.loads((chain / "base" / "vm.json").read_text())
    assert base["parent"] is None and base["pages"] is None


@pytest.mark.parametrize("mode", ["eager", "cow", "lazy"])
def test_a_chain_restores_the_same_ram_as_a_full_snapshot(chain, mode):
    with MicroVM.restore(chain / "full", memory="eager") as full, \
            MicroVM.restore(chain / "d2", memory=mode) as diff:
        assert regions(diff) == regions(full)
        assert diff.memory.read(0x3F00000, 19) == b"written by the host"


def test_a_restored_chain_continues_where_the_full_snapshot_does(chain):
    out = []
    for path in (chain / "d2", chain / "full"):
        with MicroVM.restore(path) as vm:
            vm.start()
            out.append(wait_lines(vm, 3))
    assert out[0] == out[1]


def test_snapshotted_mid_run_two_copies_continue_and_diverge(tmp_path):
    vm = counter(pages=8)
    vm.pause()
    vm.snapshot(tmp_path / "s")
    before = vm.console_output     # may end in the middle of a line
    vm.close()
    saved = [int(n) for n, _ in LINE.findall(before)]
    copies = [MicroVM.restore(tmp_path / "s") for _ in range(2)]
    try:
        for step, copy in zip((b"2", b"7"), copies):
            copy.start()
            wait_lines(copy, 2)
            copy.send_input(step)
        for copy in copies:
            wait_lines(copy, 40)
            copy.send_input(b"q")
            assert copy.wait(10) is not None
        runs = [[int(n) for n, _ in LINE.findall(before + c.console_output)] for c in copies]
        # both continue from the saved point: the line cut by the snapshot
        # is finished, and the count goes on in steps of 50000 (step 1) ...
        for run in runs:
            head = run[:len(saved) + 2]
            assert head == [saved[0] + 50000 * i for i in range(len(head))], head
        first_line = min(c.console_output.index(b"\n") for c in copies)
        assert copies[0].console_output[:first_line] == copies[1].console_output[:first_line]
        # ... and then each goes its own way, with its own step
        steps = [run[-1] - run[-2] for run in runs]
        assert steps == [100000, 350000], steps
    finally:
        for copy in copies:
            copy.close()


def test_clone_makes_independent_copies():
    vm = counter(pages=4)
    vm.pause()
    clones = vm.clone(3)
    try:
        vm.close()
        for i, c in enumerate(clones):
            c.start()
            c.send_input(str(i + 1).encode())
        for i, c in enumerate(clones):
            wait_lines(c, 30)
            c.send_input(b"q")
            assert c.wait(10) is not None
            tail = LINE.findall(c.console_output)[-2:]
            assert int(tail[1][0]) - int(tail[0][0]) == 50000 * (i + 1)
    finally:
        for c in clones:
            c.close()
        vm.close()


def test_diffs_need_tracking_and_their_parents(chain, tmp_path):
    vm = counter(pages=4)
    try:
        vm.pause()
        with pytest.raises(SnapshotError, match="track_dirty=True"):
            vm.snapshot(tmp_path / "x", diff=True)
    finally:
        vm.close()
    # a chain whose parent went away, or was replaced by another snapshot
    moved = tmp_path / "moved"
    shutil.copytree(chain / "d2", moved)
    with pytest.raises(SnapshotError, match="parent snapshot cannot be read"):
        MicroVM.restore(moved)
    other = tmp_path / "c"
    shutil.copytree(chain / "base", tmp_path / "d1")
    shutil.copytree(chain / "d2", other)
    with pytest.raises(SnapshotError, match="is another snapshot"):
        MicroVM.restore(other)


def test_a_restored_vm_can_take_a_diff_on_its_snapshot(chain, tmp_path):
    shutil.copytree(chain, tmp_path / "c")
    with MicroVM.restore(tmp_path / "c" / "d2", track_dirty=True) as vm:
        vm.start()
        wait_lines(vm, 2)
        vm.pause()
        vm.snapshot(tmp_path / "c" / "d3", diff=True)
        want = regions(vm)
    with MicroVM.restore(tmp_path / "c" / "d3", memory="eager") as vm:
        assert regions(vm) == want


class CountingProvider:
    """A page provider of the caller's: serves the snapshot file, counting."""

    def __init__(self, path, regions):
        self.inner = FileProvider(os.path.join(path, "memory"), regions)
        self.reads = 0
        self.closed = False

    def read(self, region, offset, out):
        self.reads += 1
        self.inner.read(region, offset, out)

    def close(self):
        self.closed = True
        self.inner.close()


def test_a_lazy_restore_takes_pages_from_any_provider(chain):
    header = json.loads((chain / "full" / "vm.json").read_text())
    provider = CountingProvider(str(chain / "full"), header["regions"])
    with MicroVM.restore(chain / "full", memory="lazy", pages=provider, prefetch=False) as vm:
        vm.start()
        wait_lines(vm, 2)
    assert provider.reads > 0 and provider.closed
    with pytest.raises(SnapshotError, match="memory='lazy'"):
        MicroVM.restore(chain / "full", pages=provider)


def test_lazy_restore_prefetches_what_the_last_run_touched(chain, tmp_path):
    snap = tmp_path / "s"
    shutil.copytree(chain / "full", snap)
    stats = []
    for _ in range(2):
        with MicroVM.restore(snap, memory="lazy") as vm:
            pager = next(a.pager for a in vm.attachments if a.name == "snapshot-pager")
            vm.start()
            wait_lines(vm, 2)
            vm.pause()
            stats.append(pager.stats)
    assert (snap / "workingset.json").exists()
    assert stats[0].prefetched == 0
    assert stats[1].prefetched > 0
    assert stats[1].faults < stats[0].faults


@pytest.mark.parametrize("transport", ["pci", "mmio"])
def test_a_virtio_console_comes_back_connected(tmp_path, transport):
    mmio = int(transport == "mmio")
    with MicroVM("virtio_console", memory="64M", args=f"mmio={mmio}") as vm:
        con = vm.add_virtio_console(transport=transport)
        vm.start()
        assert con.wait_output(b"over virtio-console\n", 60), con.output
        assert con.send_input(b"before\n") == 7
        assert con.wait_output(b"echo: before\n", 60), con.output
        vm.pause()
        vm.snapshot(tmp_path / "s")
    for _ in range(2):
        with MicroVM.restore(tmp_path / "s") as clone:
            names = [a.name for a in clone.attachments]
            assert "virtio-console0" in names
            con = next(a.device for a in clone.attachments if a.name == "virtio-console0")
            clone.start()
            assert con.send_input(b"after\n") == 6
            assert con.wait_output(b"echo: after\n", 60), con.output
            con.send_input(b"quit\n")
            assert clone.wait(20) == 0


def test_changes_must_name_saved_devices(tmp_path):
    with MicroVM("virtio_console", memory="64M") as vm:
        vm.add_virtio_console()
        vm.start()
        vm.pause()
        vm.snapshot(tmp_path / "s")
    with pytest.raises(SnapshotError, match="no saved device named virtio-blk0"):
        MicroVM.restore(tmp_path / "s", devices={"virtio-blk0": {"backend": "x"}})


@pytest.mark.parametrize("mode,shadow", [("mmio", 0), ("mmio", 1), ("ioeventfd", 0),
                                         ("shadow", 1)])
def test_an_nvme_disk_saved_mid_io_finishes_on_a_copy_of_its_disk(tmp_path, mode, shadow):
    """Saved in the middle of the guest's writes: the restored VM issues the
    rest to the disk it is given (every read checked by the guest), and the
    VM that was saved goes on too."""
    from hvkit.storage.raw import RawFileBackend
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(16 << 20))
    ios = 20000 if mode == "mmio" else 100000       # half of them writes, then reads
    backend = RawFileBackend(str(disk))
    try:
        with MicroVM("nvme", memory="64M", args=f"shadow={shadow} ios={ios} qd=8") as vm:
            ctrl = vm.add_nvme([backend], mode=mode)
            vm.start()
            time.sleep(0.15)
            vm.pause()
            assert vm.state == "paused", vm.console_output.decode()
            written = ctrl.io_counters()["write_commands"]
            assert written < ios // 2, f"the writes were over before the snapshot ({written})"
            vm.snapshot(tmp_path / "s")
            shutil.copy(disk, tmp_path / "copy.img")
            # the VM saved goes on too (its accelerator, if any, starts again)
            vm.resume()
            assert vm.wait(120) == 0, vm.console_output.decode()
    finally:
        backend.close()
    saved = json.loads((tmp_path / "s" / "vm.json").read_text())
    assert saved["attachments"]["nvme0"]["ctrl"]["sqs"], "saved before the I/O queues existed"
    copy = {"nvme0": {"disks": [str(tmp_path / "copy.img")]}}
    if mode != "mmio":
        # the accelerator process maps guest RAM: memfd (eager), not the file
        with pytest.raises(SnapshotError, match="not memfd-backed"):
            MicroVM.restore(tmp_path / "s", devices=copy)
    with MicroVM.restore(tmp_path / "s", devices=copy,
                         memory="cow" if mode == "mmio" else "eager") as vm:
        nvme = next(a for a in vm.attachments if a.name == "nvme0")
        vm.start()
        assert vm.wait(120) == 0, vm.console_output.decode()
        assert nvme.ctrl.io_counters()["write_commands"] > 0     # writes after the restore
    # both disks end with the whole pattern
    assert (tmp_path / "copy.img").read_bytes() == disk.read_bytes()


@pytest.mark.parametrize("transport", ["pci", "mmio"])
def test_a_virtio_disk_saved_mid_io_finishes_on_a_copy_of_its_disk(tmp_path, transport):
    """Requests in flight when the VM is saved complete in the restored VM
    (on the copy of the disk it is given), and every read checks out."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(16 << 20))
    mmio = int(transport == "mmio")
    with MicroVM("virtio_blk", memory="64M", args=f"mmio={mmio} ios=20000 qd=8") as vm:
        vm.add_virtio_blk(str(disk), transport=transport)
        vm.start()
        time.sleep(0.3)
        vm.pause()
        assert vm.state == "paused", vm.console_output.decode()
        vm.snapshot(tmp_path / "s")
        shutil.copy(disk, tmp_path / "copy.img")
    with MicroVM.restore(tmp_path / "s",
                         devices={"virtio-blk0": {"backend": str(tmp_path / "copy.img")}}) as vm:
        vm.start()
        assert vm.wait(120) == 0, vm.console_output.decode()
        assert "virtio-blk: ok" in vm.console_output.decode()


def test_the_cli_restores_a_device_on_another_disk(tmp_path):
    import subprocess
    import sys
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(16 << 20))
    with MicroVM("virtio_blk", memory="64M", args="ios=64 qd=4") as vm:
        vm.add_virtio_blk(str(disk))
        vm.start()
        vm.pause()
        vm.snapshot(tmp_path / "s")
    disk.rename(tmp_path / "moved.img")

    def hvkit(*args):
        return subprocess.run([sys.executable, "-m", "hvkit", *args], capture_output=True,
                              timeout=120)
    r = hvkit("snapshot", "info", str(tmp_path / "s"), "--json")
    made = json.loads(r.stdout)["made_again_on_restore"]
    assert made["virtio-blk0"]["backend"] == str(disk)
    r = hvkit("snapshot", "restore", str(tmp_path / "s"), "--timeout", "60")
    assert r.returncode == 2 and b"hvkit: error:" in r.stderr and b"disk.img" in r.stderr
    assert b"Traceback" not in r.stderr
    r = hvkit("snapshot", "restore", str(tmp_path / "s"), "--timeout", "60",
              "--device", f"virtio-blk0:backend={tmp_path / 'moved.img'}")
    assert r.returncode == 0, r.stderr
    assert b"virtio-blk: ok" in r.stdout


def test_a_truncated_or_corrupted_snapshot_is_refused_and_nothing_starts(chain, tmp_path):
    import threading
    before = threading.active_count()
    cut = tmp_path / "cut"
    shutil.copytree(chain / "full", cut)
    os.truncate(cut / "memory", 1 << 20)
    with pytest.raises(SnapshotError, match="does not fit the memory file"):
        MicroVM.restore(cut)
    bad = tmp_path / "bad"
    shutil.copytree(chain / "full", bad)
    text = (bad / "vm.json").read_bytes()
    (bad / "vm.json").write_bytes(text[:len(text) // 2])
    with pytest.raises(SnapshotError, match="not a snapshot header"):
        MicroVM.restore(bad)
    diff = tmp_path / "d"
    shutil.copytree(chain, diff, dirs_exist_ok=True)
    header = json.loads((diff / "d2" / "vm.json").read_text())
    header["pages"][0].append([1 << 30, 1])
    (diff / "d2" / "vm.json").write_text(json.dumps(header))
    with pytest.raises(SnapshotError, match="damaged page list"):
        MicroVM.restore(diff / "d2")
    assert threading.active_count() == before


def test_a_failed_diff_loses_no_pages_for_the_next(tmp_path):
    vm = counter(pages=8)
    try:
        vm.pause()
        vm.snapshot(tmp_path / "base", track_dirty=True)
        vm.resume()
        wait_lines(vm, 2, start=len(vm.console_output))
        vm.pause()
        (tmp_path / "d1").mkdir()
        (tmp_path / "d1" / "memory.tmp").mkdir()     # the memory file cannot be written
        with pytest.raises(SnapshotError, match="cannot write the snapshot"):
            vm.snapshot(tmp_path / "d1", diff=True)
        (tmp_path / "d1" / "memory.tmp").rmdir()
        vm.snapshot(tmp_path / "d1", diff=True)      # the pages of the failed try included
        want = regions(vm)
    finally:
        vm.close()
    with MicroVM.restore(tmp_path / "d1", memory="eager") as restored:
        assert regions(restored) == want
