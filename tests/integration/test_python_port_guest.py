"""A VMM author's Python device on a port is served from inside the run
loop, with the bus's behaviour: replies reach the guest, an error the device
raises stops the VM with that error, and a removed device stops answering."""
import struct

import pytest

from hvkit.machine import MicroVM
from hvkit.vmm import EntryState

PORT = 0xE0
# mov dx, 0xE0; in eax, dx; mov dx, 0x500; out dx, eax (the exit port); jmp $
READ_AND_EXIT = bytes([0x66, 0xBA, PORT, 0x00, 0xED, 0x66, 0xBA, 0x00, 0x05, 0xEF, 0xEB, 0xFE])


def code_vm(code):
    def loader(vmm):
        vmm.memory.write(0x100000, code)
        return EntryState(mode="long", rip=0x100000, stack=0x80000)
    return MicroVM(loader=loader, memory="16M")


class Port:
    def __init__(self, value=0):
        self.value, self.writes = value, 0

    def read(self, offset, size):
        return struct.pack("<I", self.value)[:size]

    def write(self, offset, data):
        self.writes += 1
        if self.writes == 50:
            raise RuntimeError("the device gave up")


def test_a_read_reply_reaches_the_guest_from_inside_the_loop():
    with code_vm(READ_AND_EXIT) as vm:
        vm.add_device(vm.io_bus, PORT, 4, Port(0x1234ABCD), "bench")
        assert vm.run(timeout=30) == 0x1234ABCD
        assert vm.exit_counts()["python_port"] == 1


def test_guest_writes_are_served_in_the_loop_and_a_device_error_stops_the_vm():
    dev = Port()
    with MicroVM("exitloop", args=f"n=40 port={PORT}", memory="64M") as vm:
        vm.add_device(vm.io_bus, PORT, 1, dev, "bench")
        vm.run(timeout=60)
        assert dev.writes == 40 and vm.exit_counts()["python_port"] == 40
    dev = Port()
    with MicroVM("exitloop", args=f"n=100 port={PORT}", memory="64M") as vm:
        vm.add_device(vm.io_bus, PORT, 1, dev, "bench")
        with pytest.raises(RuntimeError, match="the device gave up"):
            vm.run(timeout=60)
        assert vm.exit_reason == "error" and dev.writes == 50


def test_a_removed_device_no_longer_answers():
    dev = Port(7)
    with code_vm(READ_AND_EXIT) as vm:
        vm.add_device(vm.io_bus, PORT, 4, dev, "bench")
        vm.remove_device(vm.io_bus, dev)
        assert vm.run(timeout=30) == 0xFFFFFFFF          # an open bus reads all ones
        assert vm.io_bus.unhandled == 1


def test_without_native_devices_the_bus_serves_it():
    def loader(vmm):
        vmm.memory.write(0x100000, READ_AND_EXIT)
        return EntryState(mode="long", rip=0x100000, stack=0x80000)
    with MicroVM(loader=loader, memory="16M", native_devices=False) as vm:
        vm.add_device(vm.io_bus, PORT, 4, Port(99), "bench")
        assert vm.run(timeout=30) == 99
        assert vm.exit_counts()["python_port"] == 0
