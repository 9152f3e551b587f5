import errno
import struct

import pytest

from hvkit.devices.hypercall import BLOCK, HC_FAULT, HypercallError, HypercallPort, USER_BASE
from hvkit.errors import ConfigError, GuestCrash
from hvkit.memory.guest import GuestMemory


@pytest.fixture
def mem():
    m = GuestMemory.create(1 << 20)
    yield m
    m.close()


def call(port, mem, nr, *args, gpa=0x4000):
    a = list(args) + [0] * (6 - len(args))
    mem.write(gpa, BLOCK.pack(nr, *a, 0))
    port.write(0, struct.pack("<I", gpa))
    return struct.unpack("<q", mem.read(gpa + 56, 8))[0]


def test_handler_gets_args_and_returns_value(mem):
    port = HypercallPort(mem)
    port.register(USER_BASE, lambda c: sum(c.args), "sum")
    assert call(port, mem, USER_BASE, 1, 2, 3) == 6
    assert port.calls == 1


def test_unknown_call_returns_enosys(mem):
    port = HypercallPort(mem)
    assert call(port, mem, 0x9999) == -errno.ENOSYS


def test_handler_error_becomes_negative_errno(mem):
    port = HypercallPort(mem)

    def bad(c):
        raise HypercallError(errno.EPERM)

    port.register(USER_BASE, bad)
    assert call(port, mem, USER_BASE) == -errno.EPERM


def test_block_outside_ram_is_ignored(mem):
    port = HypercallPort(mem)
    port.write(0, struct.pack("<I", 0xFFFFFFF0))   # no crash, nothing written
    assert port.calls == 0


def test_duplicate_registration_refused(mem):
    port = HypercallPort(mem)
    port.register(USER_BASE, lambda c: 0, "a")
    with pytest.raises(ConfigError, match="already registered"):
        port.register(USER_BASE, lambda c: 0, "b")


def test_fault_report_raises_guest_crash(mem):
    port = HypercallPort(mem)
    with pytest.raises(GuestCrash) as info:
        call(port, mem, HC_FAULT, 14, 4, 0x100B22, 0xDEAD000, 0x14000, 1)
    e = info.value
    assert "#PF" in str(e) and "cr2=0xdead000" in str(e)
    assert e.vcpu == 1 and e.data["vector"] == 14


@pytest.mark.parametrize("nr,handler,match", [
    (5, 3, "not callable"),
    (-1, lambda c: 0, "not an integer"),
    (1 << 64, lambda c: 0, "not an integer"),
    ("0x1000", lambda c: 0, "not an integer"),
    (True, lambda c: 0, "not an integer"),
])
def test_bad_registrations_refused(mem, nr, handler, match):
    port = HypercallPort(mem)
    with pytest.raises(ConfigError, match=match):
        port.register(nr, handler)


def test_numbers_stay_in_their_owners_range(mem):
    from hvkit.devices.hypercall import RANGES, owner_of
    from hvkit.memory import dedup
    from hvkit.time import probe
    ordered = sorted(RANGES)
    for (a0, a1, *_), (b0, b1, *_) in zip(ordered, ordered[1:]):
        assert a1 < b0, "hypercall ranges overlap"
    assert {owner_of(n) for n in (dedup.HC_DEDUP_INFO, dedup.HC_DEDUP_ENABLE,
                                  dedup.HC_DEDUP_DISABLE)} == {"dedup"}
    assert owner_of(dedup.HC_GATE) == "gate"
    assert {owner_of(probe.HC_HOST_NS), owner_of(probe.HC_TICKS_READY)} == {"time"}
    port = HypercallPort(mem)
    port.register(0x1100, lambda c: 0, "x", owner="dedup")
    with pytest.raises(ConfigError, match="not in the range of 'dedup'"):
        port.register(0x1200, lambda c: 0, "y", owner="dedup")


def test_state_names_the_registered_calls(mem):
    port = HypercallPort(mem)
    port.register(0x1000, lambda c: 0, "sum")
    state = port.state()
    assert state["handlers"]["0x1000"] == "sum"
    other = HypercallPort(mem)
    with pytest.raises(ConfigError, match="0x1000 \\(sum\\)"):
        other.restore(state)
