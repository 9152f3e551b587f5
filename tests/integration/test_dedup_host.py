"""The host side of selective dedup against a hostile or careless guest:
every hypercall argument is checked, memfd RAM is refused, and the number
of mappings a guest can make the host split is bounded."""
from __future__ import annotations

import errno
import struct

import pytest

from hvkit.devices.hypercall import BLOCK
from hvkit.errors import ConfigError
from hvkit.memory import ksm
from hvkit.memory.dedup import (HC_DEDUP_DISABLE, HC_DEDUP_ENABLE, HC_DEDUP_INFO, Dedup,
                                GuestGate)

MiB = 1 << 20
PAGE = 4096
U64 = (1 << 64) - 1


def need_ksm() -> None:
    st = ksm.ksm_status()
    if not st.available:
        pytest.skip(f"KSM unavailable: {st.reason}")


def hypercall(vm, nr: int, *args: int) -> int:
    """Issue a hypercall through the port exactly as a guest does: a block
    in guest memory, its address written to the port."""
    block = 0x7000
    a = list(args) + [0] * (6 - len(args))
    vm.memory.write(block, BLOCK.pack(nr, *a, 0))
    vm.hypercalls.write(0, struct.pack("<I", block))
    return struct.unpack("<q", vm.memory.read(block + 56, 8))[0]


@pytest.mark.kvm
def test_memfd_ram_is_refused_with_the_reason(microvm):
    need_ksm()
    vm = microvm("dedup", memory="64M", memory_backing="memfd")
    with pytest.raises(ConfigError, match="anonymous"):
        Dedup(vm, window_size=16 * MiB)


@pytest.mark.kvm
def test_window_must_fit_one_region(microvm):
    need_ksm()
    vm = microvm("dedup", memory="64M", memory_backing="anonymous")
    with pytest.raises(ConfigError, match="does not fit"):
        Dedup(vm, window_size=128 * MiB)
    with pytest.raises(ConfigError, match="not inside"):
        Dedup(vm, window=(60 * MiB, 8 * MiB))


@pytest.mark.kvm
@pytest.mark.parametrize("nr,gpa,pages,err", [
    (HC_DEDUP_ENABLE, 0, 1, errno.EFAULT),                      # guest image, not window
    (HC_DEDUP_ENABLE, 48 * MiB - PAGE, 1, errno.EFAULT),        # just below the window
    (HC_DEDUP_ENABLE, 64 * MiB, 1, errno.EFAULT),               # past the end of RAM
    (HC_DEDUP_ENABLE, 1 << 40, 1, errno.EFAULT),                # far outside RAM
    (HC_DEDUP_ENABLE, U64 & ~0xFFF, 1, errno.EFAULT),           # wraps around
    (HC_DEDUP_ENABLE, 48 * MiB + 1, 1, errno.EINVAL),           # unaligned
    (HC_DEDUP_ENABLE, 48 * MiB, 0, errno.EINVAL),               # nothing
    (HC_DEDUP_ENABLE, 48 * MiB, U64, errno.EINVAL),             # -1 pages
    (HC_DEDUP_ENABLE, 60 * MiB, 1025, errno.EFAULT),            # runs off the window
    (HC_DEDUP_DISABLE, 0x1000, 1, errno.EFAULT),
    (HC_DEDUP_DISABLE, 48 * MiB, 1 << 33, errno.EINVAL),
    (HC_DEDUP_INFO, 99, 0, errno.EINVAL),
])
def test_hostile_arguments_get_an_error(microvm, nr, gpa, pages, err):
    need_ksm()
    vm = microvm("dedup", memory="64M", memory_backing="anonymous")
    dd = Dedup(vm, window_size=16 * MiB).attach()
    try:
        assert hypercall(vm, nr, gpa, pages) == -err
        st = dd.stats()
        assert st.nominated == 0 and st.marked == 0
    finally:
        dd.detach()


@pytest.mark.kvm
def test_info_and_a_good_request(microvm):
    need_ksm()
    vm = microvm("dedup", memory="64M", memory_backing="anonymous")
    dd = Dedup(vm, window_size=16 * MiB).attach()
    try:
        assert hypercall(vm, HC_DEDUP_INFO, 0) == 48 * MiB
        assert hypercall(vm, HC_DEDUP_INFO, 1) == 16 * MiB
        assert hypercall(vm, HC_DEDUP_ENABLE, 48 * MiB, 4) == 0
        assert hypercall(vm, HC_DEDUP_INFO, 2) == 4
        # Never written by the guest: nominated, not marked.
        assert hypercall(vm, HC_DEDUP_INFO, 3) == 0
        assert hypercall(vm, HC_DEDUP_DISABLE, 48 * MiB, 4) == 0
        assert dd.stats().nominated == 0
    finally:
        dd.detach()


@pytest.mark.kvm
def test_a_real_guest_asking_outside_the_window_gets_einval(microvm):
    need_ksm()
    vm = microvm("hello", memory="64M", memory_backing="anonymous",
                 args=f"hypercall={HC_DEDUP_ENABLE}")
    dd = Dedup(vm, window_size=16 * MiB).attach()
    assert vm.run(timeout=20) == 0
    # hello passes arguments 1..6: gpa 1 is not page-aligned.
    assert f"hypercall {HC_DEDUP_ENABLE} returned -{errno.EINVAL}".encode() in vm.console_output
    dd.detach()


@pytest.mark.kvm
def test_mapping_splits_are_bounded(microvm):
    """Every separate run of mergeable pages splits the host mapping; a
    guest nominating every other page must not exhaust vm.max_map_count."""
    need_ksm()
    vm = microvm("dedup", memory="64M", memory_backing="anonymous",
                 args="mode=dedup pages=64 others=0 cow=0")
    dd = Dedup(vm, window_size=16 * MiB, max_runs=4).attach()
    gate = GuestGate(vm)
    vm.start()
    gate.wait(1, timeout=30)
    try:
        assert dd.stats().marked == 64
        dd.disable(dd.gpa, 64)
        for k in range(0, 22, 2):                 # 11 separate pages
            dd.enable(dd.gpa + k * PAGE, 1)
        st = dd.stats()
        assert (st.marked, st.deferred) == (4, 7)
        assert len(dd.marked_ranges()) == 4
        for k in range(1, 21, 2):                 # fill the gaps: one run again
            dd.enable(dd.gpa + k * PAGE, 1)
        st = dd.stats()
        assert st.marked == 21 and st.deferred == 0
        assert dd.marked_ranges() == [(dd.gpa, 21)]
        assert hypercall(vm, HC_DEDUP_INFO, 3) == 21
    finally:
        gate.release(1)
        gate.release(2)
        assert vm.wait(30) == 0
        dd.detach()

