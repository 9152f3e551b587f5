"""Snapshots: a paused VM saved and restored (eager, copy-on-write, lazy)
continues where it was; clones are independent; bad snapshots are refused."""
import json
import os
import time

import pytest

from hvkit import MicroVM
from hvkit.errors import HvkitError
from hvkit.snapshot import SnapshotError, restore_attachment
from hvkit.vmm.attach import Attachment

pytestmark = pytest.mark.kvm


def wait_for(vm, text, timeout=20.0):
    end = time.monotonic() + timeout
    while text not in vm.console_output:
        assert time.monotonic() < end, vm.console_output
        time.sleep(0.005)


@pytest.fixture(scope="module")
def echo_snapshot(tmp_path_factory):
    """The echo guest, booted once and saved waiting for input."""
    path = str(tmp_path_factory.mktemp("snap") / "echo")
    with MicroVM("echo") as vm:
        vm.start()
        wait_for(vm, b"echo ready")
        vm.pause()
        times = vm.snapshot(path)
        assert set(times) == {"state_s", "memory_s"}
    return path


@pytest.mark.parametrize("mode", ["cow", "eager", "lazy"])
def test_restored_vm_continues(echo_snapshot, mode):
    with MicroVM.restore(echo_snapshot, memory=mode) as vm:
        assert vm.state == "created"
        vm.start()
        vm.send_input(b"hello\x04")
        assert vm.wait(20) == 5
        assert vm.console_output == b"hello"


def test_clones_are_independent(echo_snapshot):
    clones = [MicroVM.restore(echo_snapshot) for _ in range(4)]
    try:
        for i, vm in enumerate(clones):
            vm.start()
            vm.send_input(b"x" * (i + 1) + b"\x04")
        for i, vm in enumerate(clones):
            assert vm.wait(20) == i + 1
            assert vm.console_output == b"x" * (i + 1)
    finally:
        for vm in clones:
            vm.close()


def test_snapshot_file_is_sparse(echo_snapshot):
    st = os.stat(os.path.join(echo_snapshot, "memory"))
    assert st.st_size == 64 << 20
    assert st.st_blocks * 512 < 8 << 20          # an idle guest writes little


def test_only_a_paused_vm_is_saved(tmp_path):
    with MicroVM("echo") as vm:
        vm.start()
        wait_for(vm, b"echo ready")
        with pytest.raises(SnapshotError, match="paused"):
            vm.snapshot(str(tmp_path / "s"))


def copy_snapshot(src, dst, edit):
    os.makedirs(dst)
    os.link(os.path.join(src, "memory"), os.path.join(dst, "memory"))
    with open(os.path.join(src, "vm.json")) as f:
        header = json.load(f)
    edit(header)
    with open(os.path.join(dst, "vm.json"), "w") as f:
        json.dump(header, f)
    return dst


def test_other_format_versions_are_refused(echo_snapshot, tmp_path):
    snap = copy_snapshot(echo_snapshot, str(tmp_path / "v9"), lambda h: h.update(version=9))
    with pytest.raises(SnapshotError, match="version 9"):
        MicroVM.restore(snap)


def test_damaged_snapshots_are_refused(echo_snapshot, tmp_path):
    def bad_region(h):
        h["regions"][0]["size"] = 1 << 40
    snap = copy_snapshot(echo_snapshot, str(tmp_path / "r"), bad_region)
    with pytest.raises(SnapshotError, match="does not fit"):
        MicroVM.restore(snap)
    with pytest.raises(SnapshotError, match="cannot read snapshot header"):
        MicroVM.restore(str(tmp_path))


def test_a_cpu_feature_this_host_lacks_is_refused(echo_snapshot, tmp_path):
    def add_feature(h):
        for row in h["cpuid"]:
            if row[0] == 7 and row[1] == 0:
                row[4] |= 1 << 16          # avx512f in leaf 7 EBX
                row[5] |= 1 << 16          # la57 in leaf 7 ECX
    snap = copy_snapshot(echo_snapshot, str(tmp_path / "cpu"), add_feature)
    fds = len(os.listdir("/proc/self/fd"))
    try:
        MicroVM.restore(snap).close()
    except SnapshotError as exc:
        assert "lacks features" in str(exc)
    else:
        pytest.skip("this host's vCPUs have both avx512f and la57: nothing is missing")
    assert len(os.listdir("/proc/self/fd")) == fds       # nothing left open


class Counter(Attachment):
    name = "counter"

    def __init__(self):
        self.value = 0

    def state(self):
        return {"value": self.value}

    def restore(self, state):
        self.value = state["value"]


def test_attachments_and_hypercalls_come_back(tmp_path):
    path = str(tmp_path / "s")
    with MicroVM("echo") as vm:
        c = vm.attach(Counter())
        c.value = 41
        vm.hypercalls.register(0x1000, lambda call: 0, "mine")
        vm.start()
        wait_for(vm, b"echo ready")
        vm.pause()
        vm.snapshot(path)
    with MicroVM.restore(path) as clone:
        assert restore_attachment(clone, Counter()).value == 41
        with pytest.raises(HvkitError, match="0x1000 \\(mine\\)"):
            clone.start()
    with MicroVM.restore(path) as clone:
        clone.hypercalls.register(0x1000, lambda call: 0, "mine")
        clone.start()
        clone.send_input(b"\x04")
        assert clone.wait(20) == 0


def boot_echo():
    return MicroVM("echo")


@pytest.mark.parametrize("text", [b"one", b"two", b"three"])
def test_the_fixture_boots_once_and_clones_per_test(microvm_clone, vm_snapshots, text):
    vm = microvm_clone("echo-fixture", boot_echo, ready=b"echo ready")
    assert b"echo ready" in vm_snapshots.boot_output["echo-fixture"]
    assert vm_snapshots.boots["echo-fixture"] == 1
    vm.start()
    vm.send_input(text + b"\x04")
    assert vm.wait(20) == len(text)
    assert vm.console_output == text


def hvkit_cmd(*args, input=None):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "hvkit", *args], capture_output=True,
                          input=input, timeout=120)


def test_snapshot_commands(tmp_path):
    snap = str(tmp_path / "s")
    r = hvkit_cmd("snapshot", "create", snap, "echo", "--at", "echo ready", "--timeout", "60")
    assert r.returncode == 0, r.stderr
    assert b"saved" in r.stdout
    r = hvkit_cmd("snapshot", "info", snap, "--json")
    info = json.loads(r.stdout)
    assert info["guest"] == "echo" and info["vcpus"] == 1 and "serial" in info["devices"]
    for mode in ("cow", "lazy"):
        r = hvkit_cmd("snapshot", "restore", snap, "--input", "--memory", mode,
                      "--timeout", "30", input=b"four\x04")
        assert r.returncode == 4 and r.stdout == b"four", (r.stdout, r.stderr)
