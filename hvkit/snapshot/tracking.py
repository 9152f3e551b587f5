"""Which guest pages changed since the last snapshot: what a diff holds.

Two sources together: KVM's dirty log on every RAM slot (the guest's own
writes, and KVM's, without an exit to user space) and the host's writes
through ``GuestMemory`` (device models, hypercall results), which KVM
cannot see.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hvkit.memory.dirty import DirtyLog
from hvkit.snapshot.format import PAGE, SnapshotError
from hvkit.vmm.attach import Attachment

if TYPE_CHECKING:
    from hvkit.vmm.runtime import Vmm


class DirtyTracker(Attachment):
    """Tracks the pages written since ``parent`` (the snapshot a diff will
    build on: the last one this VM took, or the one it was restored from)."""

    name = "snapshot-dirty-tracker"
    transient = True

    def __init__(self, parent: dict[str, str] | None = None) -> None:
        self.parent = parent
        self.logs: list[tuple[int, DirtyLog]] = []     # (region number, log)
        self.vmm: "Vmm | None" = None
        self._given_back: list[set[int]] = []

    def on_attach(self, vmm: "Vmm") -> None:
        self.vmm = vmm
        regions = list(vmm.memory)
        slots = {(s.gpa, s.size): n for n, s in vmm.vm.slots.items()}
        for index, region in enumerate(regions):
            slot = slots.get((region.gpa, region.size))
            if slot is None:
                raise SnapshotError(f"RAM region {region.name!r} has no memory slot of its own; "
                                    "diff snapshots need one slot per region")
            self.logs.append((index, DirtyLog(vmm.vm, slot).start()))
        vmm.memory.track_writes()

    def collect(self) -> list[set[int]]:
        """Per region, the page numbers (from the region's start) written
        since the last collect; clears the record."""
        assert self.vmm is not None
        regions = list(self.vmm.memory)
        out: list[set[int]] = [set() for _ in regions]
        for index, pages in enumerate(self._given_back[:len(out)]):
            out[index] |= pages
        self._given_back = []
        for index, log in self.logs:
            out[index].update(log.collect())
        for page in self.vmm.memory.take_written():
            gpa = page * PAGE
            for index, region in enumerate(regions):
                if region.gpa <= gpa < region.end:
                    out[index].add((gpa - region.gpa) // PAGE)
                    break
        return out

    def give_back(self, written: list[set[int]]) -> None:
        """A snapshot that failed after ``collect()``: its pages count
        again in the next collect, so no diff misses them."""
        self._given_back = written

    def state(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        for _, log in self.logs:
            try:
                log.stop()
            except Exception:         # the VM's slots may be gone already
                pass
        self.logs.clear()
        if self.vmm is not None and self.vmm.memory is not None:
            self.vmm.memory.untrack_writes()


def tracker_of(vmm: "Vmm") -> DirtyTracker | None:
    for att in vmm.attachments:
        if isinstance(att, DirtyTracker):
            return att
    return None
