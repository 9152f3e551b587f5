"""Snapshots: save a paused microVM, restore it eagerly, copy-on-write or
lazily, and clone it many times (each clone maps the same memory file).

    vm.pause(); vm.snapshot("snap/")          # hvkit.snapshot.save
    clone = MicroVM.restore("snap/")          # hvkit.snapshot.restore
    clone.start()

The format is in hvkit.snapshot.format.
"""
from hvkit.snapshot.format import FORMAT, VERSION, SnapshotError

__all__ = ["FORMAT", "VERSION", "SnapshotError", "restore", "restore_attachment", "save"]


def __getattr__(name: str):
    # save/restore pull in the runtime and the native layer.
    if name in ("save", "restore", "restore_attachment"):
        from hvkit.snapshot import vmstate
        return getattr(vmstate, name)
    raise AttributeError(name)
