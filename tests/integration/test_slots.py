"""Slots changed while the VM is paused: split, read-only, added, removed."""
from __future__ import annotations

import time

import pytest

from hvkit.errors import ConfigError
from hvkit.kvm.vm import MEM_READONLY
from hvkit.memory import slots
from hvkit.memory.guest import MemoryRegion

MiB = 1 << 20


@pytest.mark.kvm
def test_runtime_add_and_read_only_while_paused(microvm):
    vm = microvm("dedup", memory="48M", args="mode=slots poll_mb=64 ro_mb=40")
    vm.memory.write_u64(40 * MiB, 0x600D)
    vm.start()
    deadline = time.monotonic() + 10
    while vm.exit_counts().get("MMIO", 0) < 10:   # spinning on the hole at 64 MiB
        assert time.monotonic() < deadline, vm.console_output
        time.sleep(0.01)
    with slots.paused(vm):
        assert vm.state == "paused"
        ro = slots.carve(vm.vm, 40 * MiB, 4096, read_only=True)
        region = vm.memory.add_region(MemoryRegion(64 * MiB, 2 * MiB, backing="anonymous",
                                                   name="hot"))
        vm.memory.write_u64(64 * MiB, 0x1234ABCD)
        added = slots.add_region(vm.vm, region)
    assert vm.state == "running"
    assert vm.wait(20) == 0
    out = vm.console_output.decode()
    assert "poll value 1234abcd" in out
    assert "ro before 600d after 600d" in out      # the write was dropped
    assert vm.memory.read_u64(40 * MiB) == 0x600D
    layout = sorted((s.gpa, s.size, s.flags) for s in vm.vm.slots.values())
    assert layout == [(0, 40 * MiB, 0), (40 * MiB, 4096, MEM_READONLY),
                      (40 * MiB + 4096, 8 * MiB - 4096, 0), (64 * MiB, 2 * MiB, 0)]
    assert ro.flags == MEM_READONLY and added.gpa == 64 * MiB


@pytest.mark.kvm
def test_split_keeps_contents_and_refuses_bad_requests(microvm):
    vm = microvm("hello", memory="32M")
    vm.memory.write(16 * MiB - 8, b"ABCDEFGHIJKLMNOP")
    lo, hi = slots.split(vm.vm, 0, 16 * MiB)
    assert (lo.slot, lo.gpa, lo.size) == (0, 0, 16 * MiB)
    assert (hi.gpa, hi.size, hi.hva) == (16 * MiB, 16 * MiB, lo.hva + 16 * MiB)
    with pytest.raises(ConfigError, match="not a page boundary"):
        slots.split(vm.vm, 0, 16 * MiB + 1)
    with pytest.raises(ConfigError, match="strictly inside"):
        slots.split(vm.vm, 0, 16 * MiB)
    with pytest.raises(ConfigError, match="crosses"):
        slots.carve(vm.vm, 15 * MiB, 2 * MiB, read_only=True)
    with pytest.raises(ConfigError, match="overlaps"):
        slots.add_region(vm.vm, vm.memory.regions[0])
    slots.set_read_only(vm.vm, hi.slot, True)
    assert vm.vm.slots[hi.slot].flags == MEM_READONLY
    slots.set_read_only(vm.vm, hi.slot, False)
    slots.remove(vm.vm, hi.slot)
    with pytest.raises(ConfigError, match="no memory slot maps"):
        slots.slot_at(vm.vm, 20 * MiB)
    with pytest.raises(ConfigError, match="does not exist"):
        slots.remove(vm.vm, hi.slot)
    # Put it back and boot: the guest runs across the split.
    vm.vm.set_user_memory_region(hi.slot, hi.gpa, hi.size, hi.hva, 0)
    assert vm.run(timeout=20) == 0
    assert b"Hello" in vm.console_output
    assert vm.memory.read(16 * MiB - 8, 16) == b"ABCDEFGHIJKLMNOP"
