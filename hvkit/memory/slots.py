"""Changing a VM's memory slots after it has been built.

KVM cannot resize a slot or flip KVM_MEM_READONLY in place: both mean
deleting the slot and creating new ones, and between the two a vCPU that
touches the range would see a hole (an MMIO exit, or a guest crash). So
every function here that deletes a slot must run while no vCPU is inside
the guest: before start, or inside ``paused(machine)``. Flags-only changes
(dirty logging on/off) are atomic in KVM and safe at any time.

The host mapping is never touched: a split slot keeps pointing at the same
bytes, so guest memory contents survive every change.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator

from hvkit.errors import ConfigError
from hvkit.kvm.vm import MEM_LOG_DIRTY_PAGES, MEM_READONLY

if TYPE_CHECKING:
    from hvkit.kvm.vm import Slot, Vm
    from hvkit.memory.guest import MemoryRegion

PAGE_SIZE = 4096


def max_slots(vm: "Vm") -> int:
    n = vm.check_extension("NR_MEMSLOTS")
    return n if n > 0 else 32


def free_slot(vm: "Vm") -> int:
    """The lowest slot number not in use."""
    limit = max_slots(vm)
    for i in range(limit):
        if i not in vm.slots:
            return i
    raise ConfigError(f"all {limit} memory slots of the VM are in use")


def slot_at(vm: "Vm", gpa: int) -> "Slot":
    """The slot that maps guest-physical address ``gpa``."""
    for s in vm.slots.values():
        if s.gpa <= gpa < s.gpa + s.size:
            return s
    raise ConfigError(f"no memory slot maps guest-physical address {gpa:#x}")


def _check_free(vm: "Vm", gpa: int, size: int, ignore: int | None = None) -> None:
    for s in vm.slots.values():
        if s.slot != ignore and gpa < s.gpa + s.size and s.gpa < gpa + size:
            raise ConfigError(f"guest-physical range [{gpa:#x}, {gpa + size:#x}) overlaps "
                              f"slot {s.slot} [{s.gpa:#x}, {s.gpa + s.size:#x})")


def add_region(vm: "Vm", region: "MemoryRegion", *, read_only: bool | None = None,
               log_dirty: bool = False, slot: int | None = None) -> "Slot":
    """Map an opened MemoryRegion as a new slot (the caller keeps the
    region in its GuestMemory so the host side can reach it too)."""
    if region.mapping is None:
        raise ConfigError(f"memory region {region.name!r} is not open")
    _check_free(vm, region.gpa, region.size)
    return vm.map_region(region, free_slot(vm) if slot is None else slot,
                         read_only=read_only, log_dirty=log_dirty)


def remove(vm: "Vm", slot: int) -> None:
    """Delete a slot (the guest sees a hole there afterwards)."""
    if slot not in vm.slots:
        raise ConfigError(f"memory slot {slot} does not exist")
    vm.delete_slot(slot)


def _recreate(vm: "Vm", old: "Slot", pieces: list[tuple[int, int, int]]) -> list["Slot"]:
    """Replace ``old`` by pieces of (gpa, size, flags); on failure put
    ``old`` back as it was. The first piece keeps the old slot number."""
    vm.delete_slot(old.slot)
    made: list[int] = []
    try:
        for i, (gpa, size, flags) in enumerate(pieces):
            n = old.slot if i == 0 else free_slot(vm)
            vm.set_user_memory_region(n, gpa, size, old.hva + (gpa - old.gpa), flags)
            made.append(n)
    except BaseException:
        for n in made:
            vm.delete_slot(n)
        vm.set_user_memory_region(old.slot, old.gpa, old.size, old.hva, old.flags)
        raise
    return [vm.slots[n] for n in made]


def split(vm: "Vm", slot: int, gpa: int) -> tuple["Slot", "Slot"]:
    """Cut a slot in two at ``gpa``; the lower half keeps the number.
    Needs the vCPUs out of the guest."""
    s = vm.slots.get(slot)
    if s is None:
        raise ConfigError(f"memory slot {slot} does not exist")
    if gpa % PAGE_SIZE or not s.gpa < gpa < s.gpa + s.size:
        raise ConfigError(f"cannot split slot {slot} [{s.gpa:#x}, {s.gpa + s.size:#x}) "
                          f"at {gpa:#x}: not a page boundary strictly inside it")
    lo, hi = _recreate(vm, s, [(s.gpa, gpa - s.gpa, s.flags),
                               (gpa, s.gpa + s.size - gpa, s.flags)])
    return lo, hi


def carve(vm: "Vm", gpa: int, size: int, *, read_only: bool | None = None,
          log_dirty: bool | None = None) -> "Slot":
    """Make [gpa, gpa+size) a slot of its own (splitting the slot that
    holds it) with the given flags (None keeps the current one). Needs the
    vCPUs out of the guest unless the range already is exactly one slot
    and only dirty logging changes."""
    if gpa % PAGE_SIZE or size <= 0 or size % PAGE_SIZE:
        raise ConfigError(f"range [{gpa:#x}, +{size:#x}) is not page-aligned")
    s = slot_at(vm, gpa)
    if gpa + size > s.gpa + s.size:
        raise ConfigError(f"range [{gpa:#x}, {gpa + size:#x}) crosses the end of slot "
                          f"{s.slot} at {s.gpa + s.size:#x}")
    flags = s.flags
    if read_only is not None:
        flags = (flags | MEM_READONLY) if read_only else (flags & ~MEM_READONLY)
    if log_dirty is not None:
        flags = (flags | MEM_LOG_DIRTY_PAGES) if log_dirty else (flags & ~MEM_LOG_DIRTY_PAGES)
    if s.gpa == gpa and s.size == size:
        if (flags ^ s.flags) & MEM_READONLY:
            return _recreate(vm, s, [(gpa, size, flags)])[0]
        if flags != s.flags:
            vm.set_slot_flags(s.slot, flags)
        return vm.slots[s.slot]
    pieces = []
    if gpa > s.gpa:
        pieces.append((s.gpa, gpa - s.gpa, s.flags))
    middle = len(pieces)
    pieces.append((gpa, size, flags))
    if gpa + size < s.gpa + s.size:
        pieces.append((gpa + size, s.gpa + s.size - gpa - size, s.flags))
    return _recreate(vm, s, pieces)[middle]


def set_read_only(vm: "Vm", slot: int, read_only: bool = True) -> "Slot":
    """Make a whole slot read-only (guest writes become MMIO exits, and
    are dropped unless a device claims the address) or writable again.
    Needs the vCPUs out of the guest."""
    s = vm.slots.get(slot)
    if s is None:
        raise ConfigError(f"memory slot {slot} does not exist")
    return carve(vm, s.gpa, s.size, read_only=read_only)


@contextlib.contextmanager
def paused(machine: Any) -> Iterator[None]:
    """Park a running MicroVM's vCPUs for the block (no-op if it is not
    running, e.g. not started yet), so slots can be deleted and recreated."""
    if getattr(machine, "state", None) != "running":
        yield
        return
    machine.pause()
    try:
        yield
    finally:
        if machine.state == "paused":
            machine.resume()
