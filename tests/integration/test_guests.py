"""Boot each bundled guest on the real /dev/kvm."""
import time

import pytest

from hvkit.errors import GuestCrash, GuestTimeout

pytestmark = pytest.mark.kvm


def test_hello_prints_and_exits_with_chosen_code(microvm):
    vm = microvm("hello", memory="64M", args="exit=42")
    assert vm.run(timeout=20) == 42
    assert vm.console_output == b"Hello from an hvkit guest!\n"
    assert vm.exit_reason == "exit"


def test_hello_through_python_devices_only(microvm):
    vm = microvm("hello", args="exit=5", native_devices=False)
    assert vm.run(timeout=20) == 5
    assert vm.console_output == b"Hello from an hvkit guest!\n"
    counts = vm.exit_counts()
    assert counts["native"] == 0 and counts["IO"] >= 20


def test_native_serial_serves_output_without_python(microvm):
    vm = microvm("hello")
    vm.run(timeout=20)
    counts = vm.exit_counts()
    assert counts["native"] == counts["IO"]


def test_smp_every_vcpu_reports_its_apic_id(microvm):
    vm = microvm("smp", vcpus=2)
    assert vm.run(timeout=30) == 2
    lines = vm.console_output.decode().splitlines()
    assert sorted(lines[:2]) == ["cpu 0 apic 0 lapic 0", "cpu 1 apic 1 lapic 1"]
    assert lines[2] == "all 2 cpus reported"


def test_smp_four_vcpus_on_two_cores(microvm):
    vm = microvm("smp", vcpus=4)
    assert vm.run(timeout=60) == 4
    out = vm.console_output.decode()
    for i in range(4):
        assert f"cpu {i} apic {i} lapic {i}" in out


def test_triple_fault_raises_guest_crash_with_registers(microvm):
    vm = microvm("crash")
    with pytest.raises(GuestCrash) as info:
        vm.run(timeout=20)
    crash = info.value
    assert "triple fault" in crash.reason
    assert crash.regs is not None and crash.sregs is not None
    assert crash.regs.rip >= 0x100000
    assert "rip=" in str(crash)


def test_page_fault_in_guest_is_reported(microvm):
    vm = microvm("fault")
    with pytest.raises(GuestCrash) as info:
        vm.run(timeout=20)
    assert info.value.data["vector"] == 14
    assert info.value.data["cr2"] == 0x100000000000
    assert vm.console_output == b"about to fault\n"


def test_serial_input_is_echoed(microvm):
    vm = microvm("echo")
    vm.start()
    deadline = time.monotonic() + 20
    while b"echo ready" not in vm.console_output and time.monotonic() < deadline:
        time.sleep(0.01)
    vm.send_input(b"hello, guest\n")
    vm.send_input(b"\x04")
    assert vm.wait(20) == len(b"hello, guest\n")
    assert vm.console_output == b"echo ready\nhello, guest\n"


def test_hypercall_reaches_registered_handler(microvm):
    vm = microvm("hello", args="hypercall=4096")
    seen = []

    def handler(call):
        seen.append(call.args)
        return sum(call.args) * 100

    vm.hypercalls.register(4096, handler, "sum")
    assert vm.run(timeout=20) == 0
    assert seen == [(1, 2, 3, 4, 5, 6)]
    assert b"hypercall 4096 returned 2100" in vm.console_output


def test_unknown_hypercall_returns_enosys(microvm):
    vm = microvm("hello", args="hypercall=12345")
    assert vm.run(timeout=20) == 0
    assert b"hypercall 12345 returned -38" in vm.console_output


def test_guest_above_the_4g_hole(microvm):
    vm = microvm("hello", memory="4G")
    assert [(r.gpa, r.size) for r in vm.memory] == [(0, 3 << 30), (4 << 30, 1 << 30)]
    assert vm.run(timeout=20) == 0


def test_timeout_stops_the_guest(microvm):
    vm = microvm("echo")
    t = time.monotonic()
    with pytest.raises(GuestTimeout, match="did not finish"):
        vm.run(timeout=1.0)
    assert time.monotonic() - t < 10


def test_kernel_call_from_user_mode_and_back(microvm):
    vm = microvm("hello", args="kcall=1 exit=4")
    assert vm.run(timeout=20) == 4
    line = [l for l in vm.console_output.decode().splitlines() if l.startswith("cr3")][0]
    _, cr3, _, pml4 = line.split()
    assert cr3 == pml4
