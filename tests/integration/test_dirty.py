"""Dirty logging against a guest that writes a known set of pages."""
from __future__ import annotations

import pytest

from hvkit.errors import ConfigError
from hvkit.memory import slots
from hvkit.memory.dedup import GuestGate
from hvkit.memory.dirty import DirtyLog, manual_protect

MiB = 1 << 20
PAGE = 4096
COUNT, STRIDE = 16, 3


@pytest.mark.kvm
@pytest.mark.parametrize("manual", [
    pytest.param(True, marks=pytest.mark.kvm_cap("MANUAL_DIRTY_LOG_PROTECT2")),
    False,
], ids=["manual-protect", "classic"])
def test_dirty_pages_are_exactly_the_written_ones(microvm, manual):
    vm = microvm("dedup", memory="64M",
                 args=f"mode=dirty base_mb=32 count={COUNT} stride={STRIDE}")
    slot = slots.carve(vm.vm, 32 * MiB, 16 * MiB, log_dirty=True)
    log = DirtyLog(vm.vm, slot.slot, manual=manual)
    assert log.active and manual_protect(vm.vm) == manual
    assert log.collect() == []
    gate = GuestGate(vm)
    vm.start()
    try:
        gate.wait(1, timeout=20)
        assert log.collect() == [i * STRIDE for i in range(COUNT)]
        assert log.collect() == []          # consumed: nothing new while the guest waits
        gate.release(1)
        gate.wait(2, timeout=20)
        assert list(log.dirty_gpas()) == [32 * MiB + (i * STRIDE + 1) * PAGE
                                          for i in range(COUNT)]
        log.stop()
        assert not log.active
        with pytest.raises(ConfigError, match="start"):
            log.collect()
    finally:
        gate.release(2)
    assert vm.wait(20) == 0


@pytest.mark.kvm
def test_dirty_log_names_a_missing_slot(microvm):
    vm = microvm("dedup", memory="16M")
    with pytest.raises(ConfigError, match="slot 7 does not exist"):
        DirtyLog(vm.vm, 7)
