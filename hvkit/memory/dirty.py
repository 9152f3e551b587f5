"""Dirty-page tracking on KVM memory slots.

KVM write-protects a slot with KVM_MEM_LOG_DIRTY_PAGES and sets one bit
per 4 KiB page on the first guest write; the guest never exits to user
space for it. ``DirtyLog`` turns that into "the guest pages written since
my last call".

Two kernel modes exist. Classic: KVM_GET_DIRTY_LOG returns the bitmap and
clears (re-protects) it in one go. Manual-protect
(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2): GET only reads, and the caller
re-protects exactly the pages it has consumed with KVM_CLEAR_DIRTY_LOG,
which keeps the write-protect faults off pages nobody asked about and
closes the window between read and clear. The mode is VM-wide and cannot be
read back from KVM, so hvkit remembers it per Vm here.
"""
from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Iterator

from hvkit.errors import ConfigError
from hvkit.kvm.vm import MEM_LOG_DIRTY_PAGES

if TYPE_CHECKING:
    from hvkit.kvm.vm import Slot, Vm

PAGE_SIZE = 4096
MANUAL_PROTECT_ENABLE = 1 << 0
INITIALLY_SET = 1 << 1

_manual: "weakref.WeakKeyDictionary[Vm, bool]" = weakref.WeakKeyDictionary()


def enable_manual_protect(vm: "Vm") -> bool:
    """Switch the VM to manual-protect dirty logging where KVM offers it.

    Returns False (and changes nothing) on hosts without the capability.
    Not INITIALLY_SET: a fresh log starts empty in both modes."""
    if vm in _manual:
        return _manual[vm]
    if vm.check_extension("MANUAL_DIRTY_LOG_PROTECT2") & MANUAL_PROTECT_ENABLE:
        vm.enable_cap("MANUAL_DIRTY_LOG_PROTECT2", MANUAL_PROTECT_ENABLE)
        _manual[vm] = True
        return True
    return False


def manual_protect(vm: "Vm") -> bool:
    """Whether hvkit switched this VM to manual-protect mode."""
    return _manual.get(vm, False)


def bitmap_pages(bitmap: bytes | bytearray | memoryview, npages: int | None = None) -> list[int]:
    """Indices of the set bits of a KVM dirty bitmap (bit n = page n,
    little-endian 64-bit words), below ``npages`` if given."""
    mv = memoryview(bitmap).cast("B")
    out: list[int] = []
    nwords = len(mv) // 8
    words = mv[:nwords * 8].cast("Q")
    for w, word in enumerate(words):
        if not word:
            continue
        base = w * 64
        while word:
            low = word & -word
            out.append(base + low.bit_length() - 1)
            word ^= low
    if npages is not None:
        out = [p for p in out if p < npages]
    return out


def pages_bitmap(pages: list[int] | set[int], npages: int) -> bytearray:
    """A KVM-shaped bitmap (whole 64-bit words) with ``pages`` set."""
    bm = bytearray(((npages + 63) // 64) * 8)
    for p in pages:
        if not 0 <= p < npages:
            raise ConfigError(f"page {p} is outside a {npages}-page slot")
        bm[p >> 3] |= 1 << (p & 7)
    return bm


class DirtyLog:
    """Dirty pages of one slot since the previous ``collect()``.

    >>> log = DirtyLog(vm, slot=3).start()
    >>> ... guest runs ...
    >>> for gpa in log.dirty_gpas(): ...

    Use one DirtyLog per slot: a collect() consumes the bits it returns.
    Enabling and disabling logging is a flags-only slot update, which KVM
    applies atomically while vCPUs run.
    """

    def __init__(self, vm: "Vm", slot: int, *, manual: bool | None = None) -> None:
        if slot not in vm.slots:
            raise ConfigError(f"memory slot {slot} does not exist "
                              f"(slots: {sorted(vm.slots)})")
        self.vm = vm
        self.slot = slot
        if manual is None:
            manual = enable_manual_protect(vm)
        elif manual and not enable_manual_protect(vm):
            raise ConfigError("this host's KVM lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2")
        elif not manual and manual_protect(vm):
            raise ConfigError("this VM already uses manual-protect dirty logging "
                              "(a VM-wide mode that cannot be turned off)")
        self.manual = manual
        self.collections = 0

    @property
    def slot_info(self) -> "Slot":
        try:
            return self.vm.slots[self.slot]
        except KeyError:
            raise ConfigError(f"memory slot {self.slot} was deleted") from None

    @property
    def active(self) -> bool:
        return bool(self.slot_info.flags & MEM_LOG_DIRTY_PAGES)

    def start(self) -> "DirtyLog":
        s = self.slot_info
        if not s.flags & MEM_LOG_DIRTY_PAGES:
            self.vm.set_slot_flags(self.slot, s.flags | MEM_LOG_DIRTY_PAGES)
        return self

    def stop(self) -> None:
        s = self.vm.slots.get(self.slot)
        if s is not None and s.flags & MEM_LOG_DIRTY_PAGES:
            self.vm.set_slot_flags(self.slot, s.flags & ~MEM_LOG_DIRTY_PAGES)

    def collect_bitmap(self) -> bytearray:
        """Get and clear the slot's bitmap: the pages written since the last call."""
        s = self.slot_info
        if not s.flags & MEM_LOG_DIRTY_PAGES:
            raise ConfigError(f"dirty logging is off on slot {self.slot}; call start() first")
        bitmap = self.vm.get_dirty_log(self.slot)
        if self.manual and any(bitmap):
            # Re-protect exactly what we read; writes since GET stay logged.
            self.vm.clear_dirty_log(self.slot, 0, s.pages, bitmap)
        self.collections += 1
        return bitmap

    def collect(self) -> list[int]:
        """Page indices (within the slot) written since the last call."""
        return bitmap_pages(self.collect_bitmap(), self.slot_info.pages)

    def dirty_gpas(self) -> Iterator[int]:
        """Guest-physical addresses of the pages written since the last call."""
        base = self.slot_info.gpa
        for page in self.collect():
            yield base + page * PAGE_SIZE

    def __enter__(self) -> "DirtyLog":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
