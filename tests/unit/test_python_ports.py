"""Python devices on ports are called from inside the run loop: the same
bus contract (offset, exact-size replies, the mapping's lock, unhandled
accesses left to the bus) without the trip out of the loop. A detached
runner's forged kvm_run stands in for the guest."""
import struct
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvkit import _native
from hvkit.devices.bus import DeviceReplyError

EXIT_IO = 2
IO_IN, IO_OUT = 0, 1
RUN_REASON, RUN_UNION, DATA, MAP = 8, 32, 4096, 3 * 4096


def forge_io(runner, direction, size, port, count, data_offset=DATA):
    runner.write_raw(RUN_REASON, struct.pack("<I", EXIT_IO))
    runner.write_raw(RUN_UNION, struct.pack("<BBHIQ", direction, size, port, count,
                                            data_offset))


class Recorder:
    def __init__(self, lock, reply=None):
        self.lock, self.reply, self.calls = lock, reply, []

    def read(self, offset, size):
        assert self.lock.locked()                 # one access at a time, as on the bus
        self.calls.append(("r", offset, size))
        return self.reply(offset, size) if self.reply else bytes(range(offset, offset + size))

    def write(self, offset, data):
        assert self.lock.locked()
        self.calls.append(("w", offset, bytes(data)))


def served(base=0x70, length=4, reply=None):
    vm = _native.NativeVm()
    lock = threading.Lock()
    dev = Recorder(lock, reply)
    vm.add_python_port(base, length, dev, lock, "rec")
    runner = _native.VcpuRunner.detached(vm, MAP)
    return runner, vm, dev


def test_writes_and_reads_reach_the_device_at_their_offset():
    r, vm, dev = served()
    r.write_raw(DATA, b"\x01\x02\x03\x04\x05\x06")
    forge_io(r, IO_OUT, 2, 0x71, 3)                # rep outsw: three 2-byte writes
    assert r.serve_native() == 4
    assert dev.calls == [("w", 1, b"\x01\x02"), ("w", 1, b"\x03\x04"), ("w", 1, b"\x05\x06")]
    dev.calls.clear()
    forge_io(r, IO_IN, 2, 0x72, 2)
    assert r.serve_native() == 4
    assert dev.calls == [("r", 2, 2), ("r", 2, 2)]
    assert r.raw(DATA, 4) == b"\x02\x03\x02\x03"
    assert vm.hits(0) == 2


def test_a_reply_of_the_wrong_size_is_refused_before_the_guest_sees_it():
    r, _, _ = served(reply=lambda off, size: b"\xee" * (size - 1))
    r.write_raw(DATA, b"\xaa" * 8)
    forge_io(r, IO_IN, 4, 0x70, 1)
    with pytest.raises(DeviceReplyError, match=r"rec \(port 0x70\) answered a 4-byte read "
                                               r"with 3 bytes"):
        r.serve_native()
    assert r.raw(DATA, 8) == b"\xaa" * 8
    r2, _, _ = served(reply=lambda off, size: 7)
    forge_io(r2, IO_IN, 1, 0x70, 1)
    with pytest.raises(DeviceReplyError, match="with a int"):
        r2.serve_native()


def test_a_buffer_reply_is_taken():
    r, _, _ = served(reply=lambda off, size: bytearray(b"\x11" * size))
    forge_io(r, IO_IN, 4, 0x70, 1)
    assert r.serve_native() == 4 and r.raw(DATA, 4) == b"\x11" * 4


def test_the_device_error_comes_out_and_the_lock_is_released():
    lock = threading.Lock()

    class Broken:
        def read(self, offset, size):
            raise RuntimeError("device on fire")

        def write(self, offset, data):
            raise KeyError(offset)

    vm = _native.NativeVm()
    vm.add_python_port(0x60, 1, Broken(), lock, "broken")
    r = _native.VcpuRunner.detached(vm, MAP)
    forge_io(r, IO_IN, 1, 0x60, 1)
    with pytest.raises(RuntimeError, match="device on fire"):
        r.serve_native()
    assert not lock.locked()
    forge_io(r, IO_OUT, 1, 0x60, 1)
    with pytest.raises(KeyError):
        r.serve_native()
    assert not lock.locked()


def test_accesses_the_range_does_not_wholly_hold_and_removed_ranges_go_to_the_bus():
    r, vm, dev = served(base=0x70, length=2)
    forge_io(r, IO_IN, 4, 0x70, 1)                 # runs past the range's end
    assert r.serve_native() == 0
    forge_io(r, IO_OUT, 1, 0x72, 1)                # outside it
    assert r.serve_native() == 0
    assert vm.remove_ports(0x70, 2) == 1
    forge_io(r, IO_OUT, 1, 0x70, 1)
    assert r.serve_native() == 0
    assert dev.calls == []


def test_bad_ranges_are_refused():
    vm = _native.NativeVm()
    with pytest.raises(ValueError, match="outside the I/O space"):
        vm.add_python_port(0xFFFF, 2, Recorder(threading.Lock()), threading.Lock())
    for i in range(_native.MAX_NATIVE_PORTS):
        vm.add_null_ports(i, 1)
    with pytest.raises(ValueError, match="at most"):
        vm.add_python_port(0x100, 1, Recorder(threading.Lock()), threading.Lock())


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([IO_IN, IO_OUT]), st.integers(0, 8), st.integers(0, 0xFFFF),
       st.integers(0, (1 << 32) - 1), st.sampled_from([DATA, 0, 16, MAP - 2, MAP, 1 << 63]))
def test_hostile_exits_reach_the_device_only_inside_its_range(direction, size, port,
                                                              count, offset):
    r, _, dev = served(base=0x70, length=8)
    forge_io(r, direction, size, port, count, offset)
    rc = r.serve_native()
    if rc == 0:
        assert dev.calls == []
        return
    assert rc == 4 and size in (1, 2, 4) and 0x70 <= port and port + size <= 0x78
    assert offset >= DATA and offset + size * count <= MAP
    assert len(dev.calls) == count
    assert all(c[1] == port - 0x70 for c in dev.calls)
