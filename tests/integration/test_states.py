"""What a VM reports about itself is true: states, exit reasons, codes,
and what may be done with it at each point of its life."""
import gc
import os
import threading
import time

import pytest

from hvkit import MicroVM
from hvkit.errors import ConfigError, GuestCrash, GuestTimeout, HvkitError

pytestmark = pytest.mark.kvm


def wait_for(vm, text, timeout=20.0):
    end = time.monotonic() + timeout
    while text not in vm.console_output:
        assert time.monotonic() < end, vm.console_output
        time.sleep(0.01)


def test_wait_before_start_is_refused_at_once():
    with MicroVM("hello") as vm:
        t = time.monotonic()
        with pytest.raises(HvkitError, match="not been started"):
            vm.wait()
        with pytest.raises(HvkitError, match="not been started"):
            vm.wait(1)
        assert time.monotonic() - t < 0.5
        assert vm.state == "created"


def test_stop_reports_stopped_not_exit_code_zero():
    with MicroVM("echo") as vm:
        vm.start()
        wait_for(vm, b"echo ready")
        vm.stop()
        assert vm.state == "stopped"
        assert vm.exit_reason == "stopped" and vm.exit_code is None
        assert vm.wait() is None


def test_wait_after_timeout_raises_again():
    with MicroVM("echo") as vm:
        with pytest.raises(GuestTimeout):
            vm.run(timeout=0.5)
        assert vm.state == "stopped" and vm.exit_reason == "timeout"
        with pytest.raises(GuestTimeout):
            vm.wait()


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -1, "10"])
def test_bad_timeouts_are_refused(bad):
    with MicroVM("hello") as vm:
        with pytest.raises(ConfigError, match="timeout"):
            vm.run(timeout=bad)
        assert vm.state == "created"


def test_zero_timeout_means_no_limit():
    with MicroVM("hello", args="exit=4") as vm:
        assert vm.run(timeout=0) == 4


def test_stop_racing_start():
    for _ in range(60):
        with MicroVM("echo") as vm:
            t = threading.Thread(target=vm.stop)
            t.start()
            try:
                vm.start()
            except HvkitError as exc:       # stop() won: start is refused cleanly
                assert "stopped" in str(exc)
            t.join()
            vm.stop()
            assert vm.state == "stopped"
            assert vm.exit_reason == "stopped"


def test_calls_after_close_are_refused():
    vm = MicroVM("echo")
    vm.start()
    vm.close()
    assert vm.state == "closed"
    for call in (lambda: vm.send_input(b"x"), vm.stop, vm.wait, vm.start):
        with pytest.raises(HvkitError, match="closed"):
            call()
    vm.close()                                  # closing twice is harmless


def test_guest_reported_fault_carries_registers():
    with MicroVM("fault") as vm:
        with pytest.raises(GuestCrash) as info:
            vm.run(timeout=20)
    crash = info.value
    assert crash.regs is not None and crash.sregs is not None
    assert crash.data["cr2"] == 0x100000000000
    assert vm.exit_reason == "crash"


def test_device_can_end_the_vm_with_a_code():
    with MicroVM("echo") as vm:
        vm.start()
        wait_for(vm, b"echo ready")
        vm.request_exit(42)
        assert vm.wait(10) == 42
        assert vm.exit_reason == "exit"


def kvm_objects():
    fds = []
    for f in os.listdir("/proc/self/fd"):
        try:
            fds.append(os.readlink(f"/proc/self/fd/{f}"))
        except OSError:
            pass
    with open("/proc/self/maps") as m:
        maps = m.read()
    return (sum("kvm-vm" in f or "kvm-vcpu" in f for f in fds), maps.count("kvm-vcpu"))


def test_close_releases_kernel_objects_even_when_errors_are_kept():
    gc.collect()
    before = kvm_objects()
    kept = []
    gc.disable()
    try:
        for guest in ("crash", "fault", "crash"):
            vm = MicroVM(guest, vcpus=1)
            try:
                vm.run(timeout=20)
            except GuestCrash as exc:
                kept.append(exc)            # a user keeping the error must not keep the VM
            vm.close()
        assert kvm_objects() == before
    finally:
        gc.enable()
    assert len(kept) == 3
