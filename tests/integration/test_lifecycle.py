"""Pause, resume, stop, error propagation and teardown of MicroVMs."""
import os
import threading
import time

import pytest

from hvkit.errors import ConfigError, GuestLoadError, HvkitError
from hvkit.machine import MicroVM

pytestmark = pytest.mark.kvm


def wait_for(vm, text, timeout=20):
    deadline = time.monotonic() + timeout
    while text not in vm.console_output:
        assert time.monotonic() < deadline, f"no {text!r} on the console"
        time.sleep(0.005)


def test_pause_and_resume(microvm):
    vm = microvm("echo")
    vm.start()
    wait_for(vm, b"echo ready")
    vm.pause()
    assert vm.state == "paused"
    before = vm.exit_counts()["native"]
    time.sleep(0.3)
    assert vm.exit_counts()["native"] == before    # no vCPU ran while paused
    vm.send_input(b"ab")
    vm.resume()
    assert vm.state == "running"
    vm.send_input(b"\x04")
    assert vm.wait(20) == 2
    assert vm.console_output.endswith(b"ab")


def test_pause_resume_smp(microvm):
    vm = microvm("echo", vcpus=2)
    vm.start()
    wait_for(vm, b"echo ready")
    for _ in range(3):
        vm.pause()
        vm.resume()
    vm.send_input(b"\x04")
    assert vm.wait(20) == 0


def test_stop_from_another_thread(microvm):
    vm = microvm("echo")
    vm.start()
    wait_for(vm, b"echo ready")
    threading.Timer(0.1, vm.stop).start()
    assert vm.wait(20) is None                  # no guest exit code: the host stopped it
    assert vm.exit_reason == "stopped"
    assert vm.state == "stopped"


def test_device_exception_stops_vm_and_reaches_caller(microvm):
    vm = microvm("hello", native_devices=False)

    class Broken:
        def write(self, data):
            raise RuntimeError("console backend failed")

    vm.serial.sink = Broken()
    with pytest.raises(RuntimeError, match="console backend failed"):
        vm.run(timeout=20)
    assert vm.exit_reason == "error"


def open_fds():
    return set(os.listdir("/proc/self/fd"))


def test_teardown_leaks_no_fds_or_threads():
    # Warm up process-wide state (the shared /dev/kvm handle, the signal).
    with MicroVM("hello") as vm:
        vm.run(timeout=20)
    fds, threads = open_fds(), threading.active_count()
    for guest, vcpus in (("hello", 1), ("smp", 2), ("crash", 1)):
        with MicroVM(guest, vcpus=vcpus) as vm:
            try:
                vm.run(timeout=20)
            except HvkitError:
                pass
    vm = MicroVM("echo", vcpus=2)
    vm.start()
    vm.close()                                 # close while running
    assert threading.active_count() == threads
    assert open_fds() == fds


def test_bad_configuration_fails_before_any_vm():
    fds = open_fds()
    with pytest.raises(ConfigError, match="vcpus"):
        MicroVM("hello", vcpus=0)
    with pytest.raises(ConfigError, match="not a size"):
        MicroVM("hello", memory="lots")
    with pytest.raises(ConfigError, match="2 MiB minimum"):
        MicroVM("hello", memory="1M")
    with pytest.raises(GuestLoadError, match="no bundled guest"):
        MicroVM("nosuchguest")
    assert open_fds() == fds


def test_cannot_start_twice(microvm):
    vm = microvm("hello")
    vm.run(timeout=20)
    with pytest.raises(HvkitError, match="cannot start"):
        vm.start()
