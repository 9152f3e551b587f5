"""The snapshot format: a directory with a JSON header and a memory file.

    <dir>/vm.json   {"format": "hvkit-snapshot", "version": 2, "hvkit": "0.1.0",
                     "id": str (unique per snapshot),
                     "parent": null | {"path": str, "id": str} (a diff's base),
                     "pages": null | [[[first_page, count], ...] per region],
                     "config": {...VmConfig...}, "cmdline": str | null,
                     "regions": [{"name", "gpa", "size", "offset"}],
                     "cpuid": [[function, index, flags, eax, ebx, ecx, edx], ...],
                     "tsc_khz": int, "vcpus": [{...per-vCPU state...}],
                     "vm": {"pic_master", "pic_slave", "ioapic", "pit", "clock_ns"},
                     "devices": {name: state}, "attachments": {name: state}}
    <dir>/memory    guest RAM, region after region at page-aligned offsets;
                    pages that were all zero are holes (a sparse file)
    <dir>/workingset.json   optional: the blocks a lazily restored run
                    touched, in order (prefetched first by the next one)

A full snapshot has no parent and holds every page. A diff snapshot holds
only the pages listed in "pages" (written since its parent was taken; a
listed page that reads as a hole is a zero page) and names its parent by
path (relative to the diff's directory where it can be) and id; restoring
it applies the chain from the full snapshot up. Version 1 (no id, parent
or pages) is read as a full snapshot.

Byte blobs (xsave, lapic, irqchip) are hex. A reader refuses a version it
does not know, and a host whose CPUID lacks a feature the guest was shown.
"""
from __future__ import annotations

import json
import os
from typing import Any

from hvkit.errors import HvkitError

FORMAT = "hvkit-snapshot"
VERSION = 2
#: the versions this hvkit reads
READS = (1, 2)
HEADER = "vm.json"
MEMORY = "memory"
PAGE = 4096


class SnapshotError(HvkitError):
    """A snapshot that cannot be taken or cannot be restored here."""


def write_header(path: str, header: dict[str, Any]) -> None:
    """vm.json, written whole (a temporary file renamed over it)."""
    from hvkit.files import atomic_write
    data = json.dumps({"format": FORMAT, "version": VERSION, **header}, indent=1).encode()
    with atomic_write(os.path.join(path, HEADER), "snapshot header", error=SnapshotError) as f:
        f.write(data)


def read_header(path: str) -> dict[str, Any]:
    from hvkit.files import read_regular
    p = os.path.join(os.fspath(path), HEADER)
    if not os.path.isdir(path):
        raise SnapshotError(f"{path}: not a snapshot directory")
    raw = read_regular(p, "snapshot header", limit=64 << 20, error=SnapshotError)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SnapshotError(f"{p}: not a snapshot header: {exc}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise SnapshotError(f"{p}: not an hvkit snapshot header")
    if header.get("version") not in READS:
        raise SnapshotError(f"{p}: snapshot format version {header.get('version')!r}; "
                            f"this hvkit reads versions {', '.join(map(str, READS))}")
    for key in ("config", "regions", "cpuid", "vcpus", "vm"):
        if key not in header:
            raise SnapshotError(f"{p}: snapshot header lacks {key!r}")
    return header


def memory_path(path: str) -> str:
    return os.path.join(os.fspath(path), MEMORY)


WORKING_SET = "workingset.json"


def working_set_path(path: str) -> str:
    return os.path.join(os.fspath(path), WORKING_SET)
