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
