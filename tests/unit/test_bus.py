import pytest

from hvkit.devices.bus import Bus
from hvkit.errors import ConfigError


class Regs:
    def __init__(self):
        self.data = bytearray(16)
        self.log = []

    def read(self, offset, size):
        self.log.append(("r", offset, size))
        return bytes(self.data[offset:offset + size])

    def write(self, offset, data):
        self.log.append(("w", offset, bytes(data)))
        self.data[offset:offset + len(data)] = data


def test_dispatch_by_address_with_offsets():
    bus = Bus()
    a, b = Regs(), Regs()
    bus.register(0x100, 16, a, "a")
    bus.register(0x200, 16, b, "b")
    bus.write(0x204, b"\x01\x02")
    assert b.log == [("w", 4, b"\x01\x02")] and a.log == []
    assert bus.read(0x205, 1) == b"\x02"
    assert bus.find(0x10F).name == "a"
    assert bus.find(0x110) is None


def test_unmapped_reads_float_high_and_writes_drop():
    bus = Bus()
    assert bus.read(0x1234, 2) == b"\xff\xff"
    bus.write(0x1234, b"\0")
    assert bus.unhandled == 2


def test_overlap_refused_with_names():
    bus = Bus("port-io")
    bus.register(0x3F8, 8, Regs(), "com1")
    with pytest.raises(ConfigError, match="overlaps com1"):
        bus.register(0x3FC, 8, Regs(), "other")


def test_device_returning_wrong_size_is_a_bug_report():
    class Short:
        def read(self, offset, size):
            return b""

        def write(self, offset, data):
            pass

    bus = Bus()
    bus.register(0, 4, Short(), "short")
    with pytest.raises(RuntimeError, match="short.read returned 0 bytes"):
        bus.read(0, 4)


def test_unregister():
    bus = Bus()
    d = Regs()
    bus.register(0x10, 4, d)
    bus.unregister(d)
    assert bus.find(0x10) is None
    with pytest.raises(ConfigError):
        bus.unregister(d)


class Checked:
    """Records every access that reached it outside its own range."""

    def __init__(self, length):
        self.length = length
        self.bad = []

    def read(self, offset, size):
        if offset < 0 or offset + size > self.length:
            self.bad.append(("r", offset, size))
        return bytes(size)

    def write(self, offset, data):
        if offset < 0 or offset + len(data) > self.length:
            self.bad.append(("w", offset, len(data)))


def test_access_straddling_the_end_never_reaches_the_device():
    bus = Bus("mmio")
    dev = Checked(8)
    bus.register(0x1000, 8, dev, "regs")
    assert bus.read(0x1006, 4) == b"\xff" * 4
    bus.write(0x1007, b"\1\2")
    assert dev.bad == []
    assert (bus.unhandled, bus.straddling) == (2, 2)
    assert bus.read(0x1004, 4) == bytes(4)          # the last whole word is fine
    assert bus.unhandled == 2


def test_find_needs_the_address_inside_the_range():
    bus = Bus()
    bus.register(0x100, 0x10, Regs(), "a")
    assert bus.find(0xFF) is None
    assert bus.find(0x100).name == "a"
    assert bus.find(0x110) is None


def test_lookups_stay_consistent_while_another_thread_moves_devices():
    import sys
    import threading

    bus = Bus("mmio")
    fixed = Checked(0x1000)
    bus.register(0x10000, 0x1000, fixed, "fixed")
    movers = [Checked(0x1000) for _ in range(4)]
    stop = threading.Event()

    def move():
        # A guest reprogramming BARs: devices come and go around the fixed one.
        while not stop.is_set():
            for base, d in zip((0x8000, 0x9000, 0x11000, 0x12000), movers):
                bus.register(base, 0x1000, d)
            for d in movers:
                bus.unregister(d)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    t = threading.Thread(target=move)
    t.start()
    try:
        for n in range(100000):
            addr = 0x8000 + (n * 0x1238) % 0xB000
            bus.read(addr, 8)
            bus.write(addr, b"\0" * 4)
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(old)
    assert fixed.bad == [] and all(d.bad == [] for d in movers)


def test_device_reply_types():
    from hvkit.devices.bus import DeviceReplyError

    class Dev:
        def __init__(self, reply):
            self.reply = reply

        def read(self, offset, size):
            return self.reply

        def write(self, offset, data):
            pass

    bus = Bus()
    bus.register(0, 4, Dev(bytearray(b"ab")), "ba")
    assert bus.read(0, 2) == b"ab" and type(bus.read(0, 2)) is bytes
    bus.register(4, 4, Dev("ab"), "text")
    with pytest.raises(DeviceReplyError, match="text.read returned a str"):
        bus.read(4, 2)
    bus.register(8, 4, Dev(b"abc"), "long")
    with pytest.raises(DeviceReplyError, match="long.read returned 3 bytes for a 2-byte"):
        bus.read(8, 2)


def test_register_refuses_bad_ranges():
    bus = Bus()
    for base, length in ((-1, 4), (0, 0), (0, -4), ("0", 4), (0, 1.5)):
        with pytest.raises(ConfigError):
            bus.register(base, length, Regs())


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(ranges=st.lists(st.tuples(st.integers(0, 0x200), st.integers(1, 0x40)), max_size=6),
       accesses=st.lists(st.tuples(st.integers(0, 0x260), st.sampled_from([1, 2, 4, 8]),
                                   st.booleans()), max_size=40))
def test_devices_only_see_accesses_inside_their_range(ranges, accesses):
    bus = Bus("mmio")
    devices = []
    for base, length in ranges:
        d = Checked(length)
        try:
            bus.register(base, length, d)
        except ConfigError:
            continue
        devices.append((base, length, d))
    outside = 0
    for addr, size, is_write in accesses:
        if is_write:
            bus.write(addr, bytes(size))
        else:
            assert len(bus.read(addr, size)) == size
        outside += not any(b <= addr and addr + size <= b + n for b, n, _ in devices)
    assert all(d.bad == [] for _, _, d in devices)
    assert bus.unhandled == outside
