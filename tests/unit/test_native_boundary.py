"""The native exit handling refuses hostile lengths and bad device replies.

A detached VcpuRunner has a plain-memory kvm_run that these tests forge,
so the C port table and the Python dispatch see the values a broken or
hostile kernel/guest/device could hand them, without a VM.
"""
import os
import struct
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvkit import _native
from hvkit.devices.bus import Bus, DeviceReplyError
from hvkit.errors import KvmError

EXIT_IO, EXIT_MMIO = 2, 6
IO_IN, IO_OUT = 0, 1
RUN_REASON = 8          # kvm_run.exit_reason
RUN_UNION = 32          # kvm_run.io / kvm_run.mmio
DATA = 4096             # where KVM puts port data (KVM_PIO_PAGE_OFFSET)
MAP = 3 * 4096


def forge_io(runner, direction, size, port, count, data_offset=DATA):
    runner.write_raw(RUN_REASON, struct.pack("<I", EXIT_IO))
    runner.write_raw(RUN_UNION, struct.pack("<BBHIQ", direction, size, port, count,
                                            data_offset))


def forge_mmio(runner, addr, length, is_write, data=bytes(8)):
    runner.write_raw(RUN_REASON, struct.pack("<I", EXIT_MMIO))
    runner.write_raw(RUN_UNION, struct.pack("<Q8sIB", addr, data, length, is_write))


def fill(runner, byte=0xAA):
    runner.write_raw(DATA, bytes([byte]) * (MAP - DATA))


def runner_with(**ports):
    vm = _native.NativeVm()
    if "null" in ports:
        vm.add_null_ports(*ports["null"])
    if "exit" in ports:
        vm.add_exit_port(ports["exit"], 4)
    return _native.VcpuRunner.detached(vm, MAP), vm


# -- the C port table ----------------------------------------------------------

def test_native_port_served_within_bounds():
    r, vm = runner_with(null=(0x80, 1))
    fill(r)
    forge_io(r, IO_IN, 1, 0x80, 3)
    assert r.serve_native() == 1
    assert r.raw(DATA, 4) == b"\0\0\0\xaa"
    assert vm.hits(0) == 1


@pytest.mark.parametrize("size,count,offset", [
    (4, 0x40000001, DATA),         # size * count wraps a 32-bit product
    (1, MAP - DATA + 1, DATA),     # one byte past the mapping
    (1, 1, MAP + 4096),            # data_offset past the mapping
    (1, 1, 1 << 63),               # data_offset that wraps a subtraction
    (1, 1, 16),                    # data over kvm_run's own fields
    (3, 1, DATA),                  # not a port access size
])
def test_native_port_refuses_data_outside_kvm_run(size, count, offset):
    r, vm = runner_with(null=(0x80, 1))
    fill(r)
    forge_io(r, IO_IN, size, 0x80, count, offset)
    assert r.serve_native() == 0            # left to Python, which refuses it
    assert r.raw(DATA, MAP - DATA) == b"\xaa" * (MAP - DATA)
    assert vm.hits(0) == 0
    with pytest.raises(KvmError, match="IO exit data outside kvm_run"):
        r.serve_io(Bus("port-io"))
    assert r.raw(DATA, MAP - DATA) == b"\xaa" * (MAP - DATA)


def test_native_exit_port_straddling_its_end_goes_to_the_bus():
    r, vm = runner_with(exit=0xF4)
    forge_io(r, IO_OUT, 4, 0xF6, 1)
    r.write_raw(DATA, b"\x07\0\0\0")
    assert r.serve_native() == 0
    assert not vm.exit_requested
    forge_io(r, IO_OUT, 4, 0xF4, 1)
    assert r.serve_native() == 2
    assert vm.exit_code == 7


@settings(max_examples=400, deadline=None)
@given(direction=st.sampled_from([IO_IN, IO_OUT]), size=st.integers(0, 255),
       port=st.integers(0x7C, 0x84), count=st.integers(0, 2**32 - 1),
       offset=st.one_of(st.integers(0, 2 * MAP), st.integers(0, 2**64 - 1)))
def test_native_ports_never_write_outside_the_exit_data(direction, size, port, count, offset):
    r, _ = runner_with(null=(0x80, 2), exit=0x82)
    fill(r)
    forge_io(r, direction, size, port, count, offset)
    rc = r.serve_native()
    after = r.raw(DATA, MAP - DATA)
    n = size * count
    inside = size in (1, 2, 4) and DATA <= offset and offset + n <= MAP
    if rc:
        assert inside
    if not inside:
        assert after == b"\xaa" * (MAP - DATA)
    else:  # only [offset, offset + n) may change
        lo, hi = offset - DATA, offset - DATA + n
        assert after[:lo] == b"\xaa" * lo and after[hi:] == b"\xaa" * (MAP - DATA - hi)


# -- replies of Python devices and custom buses --------------------------------

class Fixed:
    """A custom bus (any object with read/write) that answers every read
    with the same object."""

    def __init__(self, reply, name="fixed-bus"):
        self.reply, self.name = reply, name

    def read(self, addr, size):
        return self.reply

    def write(self, addr, data):
        pass


@pytest.mark.parametrize("reply,what", [
    (b"\x01", "1 bytes"),
    (b"\x01\x02\x03\x04\x05", "5 bytes"),
    ("ab", "a str"),
    (None, "a NoneType"),
    (7, "a int"),
])
def test_port_read_reply_of_the_wrong_size_is_refused(reply, what):
    r, _ = runner_with()
    fill(r)
    forge_io(r, IO_IN, 2, 0x3F8, 4)
    with pytest.raises(DeviceReplyError, match=f"fixed-bus at 0x3f8.*2-byte read with {what}"):
        r.serve_io(Fixed(reply))
    assert r.raw(DATA, 16) == b"\xaa" * 16      # no host bytes reached the guest


def test_reply_error_names_the_device_of_a_custom_bus_with_find():
    class Named(Fixed):
        def find(self, addr):
            return type("M", (), {"name": "my-uart"})()

    r, _ = runner_with()
    forge_io(r, IO_IN, 1, 0x2F8, 1)
    with pytest.raises(DeviceReplyError, match=r"my-uart \(fixed-bus at 0x2f8\)"):
        r.serve_io(Named(b""))


def test_bytes_like_replies_of_the_right_size_are_accepted():
    r, _ = runner_with()
    forge_io(r, IO_IN, 2, 0x10, 2)
    r.serve_io(Fixed(bytearray(b"\x12\x34")))
    assert r.raw(DATA, 4) == b"\x12\x34\x12\x34"
    r.serve_io(Fixed(memoryview(b"\x56\x78")))
    assert r.raw(DATA, 2) == b"\x56\x78"


def test_mmio_reply_checked_and_lengths_bounded():
    r, _ = runner_with()
    forge_mmio(r, 0xFEB00000, 4, 0, b"\xaa" * 8)
    with pytest.raises(DeviceReplyError, match="4-byte read with 2 bytes"):
        r.serve_mmio(Fixed(b"\x01\x02"))
    assert r.mmio()[3] == b"\xaa" * 4
    r.serve_mmio(Fixed(b"\x01\x02\x03\x04"))
    assert r.mmio()[3] == b"\x01\x02\x03\x04"
    for bad in (0, 9, 0xFFFFFFFF):
        forge_mmio(r, 0xFEB00000, bad, 0)
        with pytest.raises(KvmError, match="MMIO exit of"):
            r.serve_mmio(Fixed(b""))


def test_the_bus_passes_exact_replies_and_refuses_others():
    class Dev:
        reply = b"\x01"

        def read(self, off, size):
            return self.reply

        def write(self, off, data):
            pass

    bus, dev = Bus("port-io"), Dev()
    bus.register(0x60, 1, dev, "kbd")
    r, _ = runner_with()
    forge_io(r, IO_IN, 1, 0x60, 1)
    r.serve_io(bus)
    assert r.raw(DATA, 1) == b"\x01"
    dev.reply = b""
    with pytest.raises(DeviceReplyError, match="kbd.read returned 0 bytes"):
        r.serve_io(bus)


def test_raw_access_checks_do_not_wrap():
    r, _ = runner_with()
    with pytest.raises(ValueError):
        r.raw(2**64 - 1, 2)
    with pytest.raises(ValueError):
        r.write_raw(2**64 - 1, b"ab")


# -- the console sink ----------------------------------------------------------

def test_console_sink_never_blocks_on_a_pipe_nobody_reads():
    rfd, wfd = os.pipe()
    try:
        sink = _native.ConsoleSink()
        sink.fd = wfd
        done = threading.Event()

        def flood():
            for _ in range(256):
                sink.write(b"x" * 4096)      # 1 MiB into a 64 KiB pipe
            done.set()

        threading.Thread(target=flood, daemon=True).start()
        assert done.wait(10), "a console write blocked on a full pipe"
        assert len(sink.getvalue()) == 1 << 20          # the buffer keeps it all
        assert sink.fd_dropped >= (1 << 20) - (1 << 16) - 4096
        assert sink.stalled
        # Once the reader drains the pipe, live output resumes.
        os.set_blocking(rfd, False)
        try:
            while os.read(rfd, 1 << 16):
                pass
        except BlockingIOError:
            pass
        before = sink.fd_dropped
        sink.write(b"back")
        assert sink.fd_dropped == before and not sink.stalled
        assert os.read(rfd, 16) == b"back"
    finally:
        os.close(rfd)
        os.close(wfd)


def test_console_sink_survives_a_closed_reader():
    rfd, wfd = os.pipe()
    os.close(rfd)
    try:
        sink = _native.ConsoleSink()
        sink.fd = wfd
        sink.write(b"hello")
        assert sink.getvalue() == b"hello"
        assert sink.fd_dropped == 5
    finally:
        os.close(wfd)


def test_ioctl_buffer_shorter_than_the_argument_is_refused():
    # KVM_GET_REGS copies sizeof(struct kvm_regs) bytes out whatever the
    # buffer: a short one is refused before the kernel sees it (fd -1).
    with pytest.raises(ValueError, match=r"KVM_GET_REGS: a 16-byte buffer for a 144-byte"):
        _native.ioctl_buf(-1, _native.IOCTLS["GET_REGS"], bytearray(16), "KVM_GET_REGS")
    with pytest.raises(KvmError, match="EBADF"):
        _native.ioctl_buf(-1, _native.IOCTLS["GET_REGS"], bytearray(144), "KVM_GET_REGS")
