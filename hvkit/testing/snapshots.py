"""Boot once, clone per test: snapshot fixtures for the hvkit pytest plugin.

    def boot_echo():
        return MicroVM("echo")

    @pytest.mark.kvm
    def test_echo(microvm_clone):
        vm = microvm_clone("echo", boot_echo, ready=b"echo ready")
        vm.start()
        ...

The first test that asks for a key boots the VM with ``make()``, runs it
until ``ready`` appears on its console, pauses it and saves a snapshot in
the session's temporary directory; every test then gets its own
copy-on-write clone (a restore costs milliseconds, not a boot), closed
after the test.
"""
from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterator

import pytest

if TYPE_CHECKING:
    from hvkit.machine import MicroVM


class SnapshotCache:
    """Snapshots by key, made once per session."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.paths: dict[str, str] = {}
        #: the console output of each key's boot, up to the snapshot
        self.boot_output: dict[str, bytes] = {}
        #: boots made per key (one, unless a boot failed and was retried)
        self.boots: dict[str, int] = {}
        self._lock = threading.Lock()

    def path(self, key: str, make: "Callable[[], MicroVM]", ready: bytes,
             timeout: float = 600.0) -> str:
        with self._lock:
            if key in self.paths:
                return self.paths[key]
            path = os.path.join(self.root, key.replace(os.sep, "_"))
            self.boots[key] = self.boots.get(key, 0) + 1
            vm = make()
            try:
                vm.start()
                deadline = time.monotonic() + timeout
                while ready not in vm.console_output:
                    if vm.finished.is_set() or time.monotonic() > deadline:
                        out = vm.console_output.decode(errors="replace")[-2000:]
                        why = "the VM stopped" if vm.finished.is_set() else \
                            f"not within {timeout} s"
                        raise AssertionError(f"snapshot {key!r}: {ready!r} never appeared "
                                             f"({why}); console:\n{out}")
                    time.sleep(0.01)
                vm.pause()
                vm.snapshot(path)
                self.boot_output[key] = vm.console_output
            finally:
                vm.close()
            self.paths[key] = path
            return path


@pytest.fixture(scope="session")
def vm_snapshots(tmp_path_factory: pytest.TempPathFactory) -> SnapshotCache:
    """The session's snapshots (see ``microvm_clone``)."""
    return SnapshotCache(str(tmp_path_factory.mktemp("hvkit-snapshots")))


@pytest.fixture
def microvm_clone(vm_snapshots: SnapshotCache) -> Iterator[Callable[..., "MicroVM"]]:
    """A factory: ``microvm_clone(key, make, ready, timeout=600, memory="cow",
    devices=None)`` returns a clone of the VM ``make()`` boots, as it was
    when ``ready`` appeared on its console (``devices``: changes to its saved
    devices, e.g. a disk of the test's own); clones are closed after the test."""
    from hvkit.machine import MicroVM
    made: list[MicroVM] = []

    def clone(key: str, make: "Callable[[], MicroVM]", ready: bytes, timeout: float = 600.0,
              memory: str = "cow", devices: dict | None = None) -> MicroVM:
        vm = MicroVM.restore(vm_snapshots.path(key, make, ready, timeout), memory=memory,
                             devices=devices)
        made.append(vm)
        return vm

    yield clone
    for vm in made:
        try:
            vm.close()
        except Exception:
            pass
