"""Where a restored VM's pages come from: page providers and page runs.

A lazy restore asks a ``PageProvider`` for each block of guest RAM the
guest first touches. hvkit's own providers read a snapshot's memory file
(``FileProvider``) or a chain of a full snapshot and its diffs
(``ChainProvider``: each page from the newest layer that holds it); any
object with the same ``read`` method can serve pages from elsewhere (a
remote store, a lazily fetched image).

A diff snapshot lists the pages it holds as runs: ``[[first_page, count],
...]`` per region, in page units from the region's start.
"""
from __future__ import annotations

import bisect
import os
from typing import Iterable, Protocol, Sequence

from hvkit.snapshot.format import PAGE, SnapshotError

Runs = list[list[int]]


class PageProvider(Protocol):
    """The source of a lazily restored VM's memory."""

    def read(self, region: int, offset: int, out: memoryview) -> None:
        """Fill ``out`` with the bytes of RAM region number ``region`` (in
        the snapshot's region table order) from byte ``offset`` on.
        Called from the pager's thread, one block at a time."""

    def close(self) -> None:
        """Release what the provider holds; the pager calls it last."""


def runs_of(pages: Iterable[int]) -> Runs:
    """Sorted page numbers as [first, count] runs."""
    out: Runs = []
    for p in sorted(set(pages)):
        if out and out[-1][0] + out[-1][1] == p:
            out[-1][1] += 1
        else:
            out.append([p, 1])
    return out


def check_runs(runs: object, npages: int, what: str) -> Runs:
    """A diff's run list from a header: sorted, disjoint, inside the region."""
    out: Runs = []
    end = 0
    try:
        for first, count in runs:             # type: ignore[union-attr]
            first, count = int(first), int(count)
            if first < end or count <= 0 or first + count > npages:
                raise ValueError(f"run [{first}, {count}] is out of order or outside "
                                 f"the region's {npages} pages")
            out.append([first, count])
            end = first + count
    except (TypeError, ValueError) as exc:
        raise SnapshotError(f"{what}: damaged page list: {exc}") from None
    return out


def run_pages(runs: Runs) -> int:
    return sum(count for _, count in runs)


class FileProvider:
    """Pages from one memory file laid out by a region table."""

    def __init__(self, path: str, regions: Sequence[dict]) -> None:
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SnapshotError(f"{path}: cannot open the memory file: {exc.strerror}") from None
        self.offsets = [int(r["offset"]) for r in regions]

    def read(self, region: int, offset: int, out: memoryview) -> None:
        got = os.preadv(self.fd, [out], self.offsets[region] + offset)
        if got < len(out):
            out[got:] = bytes(len(out) - got)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class DiffLayer:
    """One diff snapshot: its memory file and the pages it holds."""

    def __init__(self, path: str, regions: Sequence[dict], pages: Sequence[Runs]) -> None:
        self.file = FileProvider(path, regions)
        self.starts = [[first for first, _ in runs] for runs in pages]
        self.runs = [list(runs) for runs in pages]

    def overlay(self, region: int, offset: int, out: memoryview) -> None:
        """Copy into ``out`` the pages of [offset, offset+len) this diff holds."""
        first, last = offset // PAGE, (offset + len(out)) // PAGE
        runs, starts = self.runs[region], self.starts[region]
        i = max(bisect.bisect_right(starts, first) - 1, 0)
        while i < len(runs) and runs[i][0] < last:
            lo, hi = max(runs[i][0], first), min(runs[i][0] + runs[i][1], last)
            if lo < hi:
                a, b = lo * PAGE - offset, hi * PAGE - offset
                self.file.read(region, lo * PAGE, out[a:b])
            i += 1

    def close(self) -> None:
        self.file.close()


class ChainProvider:
    """A full snapshot with diffs over it, oldest diff first."""

    def __init__(self, base: FileProvider, diffs: Sequence[DiffLayer]) -> None:
        self.base = base
        self.diffs = list(diffs)

    def read(self, region: int, offset: int, out: memoryview) -> None:
        self.base.read(region, offset, out)
        for layer in self.diffs:
            layer.overlay(region, offset, out)

    def close(self) -> None:
        self.base.close()
        for layer in self.diffs:
            layer.close()
