"""VmConfig: every bad value refused with the field's name, before KVM;
JSON in and out."""
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from hvkit.errors import ConfigError
from hvkit.vmm.config import (MAX_FREESTANDING_VCPUS, MAX_VCPUS, EntryState, PortMap,
                              VmConfig, check_timeout)


@pytest.mark.parametrize("kwargs,field", [
    (dict(guest="hello", vcpus=0), "vcpus"),
    (dict(guest="hello", vcpus=MAX_FREESTANDING_VCPUS + 1), "vcpus"),
    (dict(kernel="vmlinux", vcpus=MAX_VCPUS + 1), "vcpus"),
    (dict(guest="hello", vcpus="2"), "vcpus"),
    (dict(guest="hello", vcpus=True), "vcpus"),
    (dict(guest="hello", vcpus=2.0), "vcpus"),
    (dict(guest="hello", memory="1M"), "memory"),
    (dict(guest="hello", memory="999999999999999999999G"), "memory"),
    (dict(guest="hello", memory=-5), "memory"),
    (dict(guest="hello", memory=4 << 50), "memory"),
    (dict(guest="hello", memory=(64 << 20) + 1), "memory"),
    (dict(guest="hello", memory=[64]), "memory"),
    (dict(guest="hello", args=123), "args"),
    (dict(guest="hello", args="x" * 5000), "args"),
    (dict(kernel="vmlinux", args="x"), "args"),
    (dict(guest=5), "guest"),
    (dict(guest=""), "guest"),
    (dict(guest="hello", kernel="vmlinux"), "not both"),
    (dict(guest="hello", initrd="x"), "initrd"),
    (dict(guest="hello", cmdline="quiet"), "cmdline"),
    (dict(kernel="vmlinux", boot="uefi"), "boot"),
    (dict(guest="hello", hugepages="yes"), "hugepages"),
    (dict(guest="hello", memory_backing="disk"), "memory_backing"),
    (dict(guest="hello", host_profile="fast"), "host_profile"),
    (dict(guest="hello", timeout=-1), "timeout"),
    (dict(guest="hello", timeout=math.nan), "timeout"),
    (dict(guest="hello", timeout=math.inf), "timeout"),
    (dict(guest="hello", timeout="10"), "timeout"),
    (dict(guest="hello", secondary_vcpus="later"), "secondary_vcpus"),
    (dict(guest="hello", ports={"serial": 0x10000}), "ports.serial"),
    (dict(guest="hello", ports={"exit": 0x3F9}), "overlaps"),
    (dict(guest="hello", ports={"pit": "no"}), "ports.pit"),
    (dict(guest="hello", ports={"ide": 0x1F0}), "unknown field 'ide'"),
    (dict(entry={"mode": "real", "rip": 0x100000}), "entry.rip"),
    (dict(entry={"mode": "smm"}), "entry.mode"),
    (dict(entry={"regs": {"rip": 1}}), "entry.regs"),
    (dict(entry={"regs": {"rax": -1}}), "entry.regs.rax"),
])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.").replace("(", r"\(")):
        VmConfig(**kwargs)


def test_sizes_and_defaults():
    c = VmConfig(guest="hello", memory="128")          # a bare number is MiB, as QEMU's -m
    assert c.memory == 128 << 20
    assert VmConfig(guest="hello", memory=64 << 20).memory == 64 << 20
    assert VmConfig(guest="hello").secondary_start == "entry"
    assert VmConfig(kernel="vmlinux").secondary_start == "wait-sipi"
    assert VmConfig(entry=EntryState()).secondary_start == "wait-sipi"
    assert VmConfig(guest="hello", timeout=0).timeout is None


def test_json_round_trip():
    c = VmConfig(kernel="/boot/vmlinuz", initrd="/tmp/i.cpio", cmdline="console=ttyS0",
                 memory="256M", vcpus=4, ports=PortMap(hypercall=0x520, rtc=None),
                 entry=EntryState(mode="protected", rip=0x100000, regs={"rbx": 0x6000}),
                 timeout=30)
    text = c.to_json()
    assert json.loads(text)["ports"]["hypercall"] == 0x520
    assert VmConfig.from_json(text) == c


def test_bytes_kernel_cannot_go_to_json():
    c = VmConfig(kernel=b"\x7fELF...")
    with pytest.raises(ConfigError, match="bytes"):
        c.to_json()


def test_port_map_lists_present_devices():
    ranges = PortMap(serial=None, post=None).ranges()
    assert [r[0] for r in ranges] == ["exit", "hypercall", "i8042", "rtc"]


@pytest.mark.parametrize("value,want", [(None, None), (0, None), (0.0, None), (2, 2.0),
                                        (0.25, 0.25)])
def test_timeouts(value, want):
    assert check_timeout(value) == want


@given(st.dictionaries(st.sampled_from(["guest", "kernel", "memory", "vcpus", "args",
                                        "timeout", "ports", "boot", "entry", "hugepages"]),
                       st.one_of(st.none(), st.integers(-2**70, 2**70), st.text(max_size=20),
                                 st.floats(), st.booleans(),
                                 st.dictionaries(st.text(max_size=8), st.integers(), max_size=3)),
                       max_size=6))
@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
def test_any_mapping_is_a_config_or_a_config_error(data):
    try:
        VmConfig.from_dict(data)
    except ConfigError:
        pass


def test_microvm_refuses_wrong_types_before_kvm():
    from hvkit.machine import MicroVM
    with pytest.raises(ConfigError, match="vcpus"):
        MicroVM("hello", vcpus="2")
    with pytest.raises(ConfigError, match="args"):
        MicroVM("hello", args=123)
    with pytest.raises(ConfigError, match="nothing to boot"):
        MicroVM()
