"""A descriptor chain the device took from a queue, and cursors over it.

The chain is already checked when a device sees it: every buffer is a
memoryview of guest RAM (never a copy), readable buffers come before
writable ones, and the total sizes are known. ``ChainReader`` and
``ChainWriter`` walk those views, so a device parses a request header with
one small copy and moves data with no copy at all; asking for more than the
chain holds raises ``ChainError``, which fails the request.
"""
from __future__ import annotations

from typing import Sequence

from hvkit.errors import HvkitError


class VirtioError(HvkitError):
    """Base of the errors a virtio device model raises on purpose."""


class ChainError(VirtioError):
    """One request is malformed (a loop, a buffer outside guest RAM, too
    little room to write the answer); the request fails, the queue goes on.
    ``head`` is the chain's head index when known, so it can be returned."""

    def __init__(self, message: str, head: int | None = None) -> None:
        super().__init__(message)
        self.head = head


class QueueBroken(VirtioError):
    """The ring itself is corrupt (an avail index far ahead, a head index
    outside the queue, rings outside guest RAM): the device needs a reset."""


class Chain:
    """One descriptor chain: ``head`` and its readable/writable buffers."""

    __slots__ = ("head", "readable", "writable", "read_len", "write_len")

    def __init__(self, head: int, readable: list[memoryview],
                 writable: list[memoryview]) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable
        self.read_len = sum(len(v) for v in readable)
        self.write_len = sum(len(v) for v in writable)

    def reader(self) -> "ChainReader":
        return ChainReader(self.readable, self.head)

    def writer(self) -> "ChainWriter":
        return ChainWriter(self.writable, self.head)

    def release(self) -> None:
        """Drop the views so guest RAM can be unmapped."""
        for v in self.readable:
            v.release()
        for v in self.writable:
            v.release()
        self.readable = []
        self.writable = []

    def __repr__(self) -> str:
        return (f"<Chain head={self.head} read={self.read_len} "
                f"write={self.write_len}>")


class _Cursor:
    def __init__(self, views: Sequence[memoryview], head: int) -> None:
        self._views = views
        self._i = 0
        self._off = 0
        self.head = head
        self.remaining = sum(len(v) for v in views)
        self.done = 0

    def take(self, n: int) -> list[memoryview]:
        """The next ``n`` bytes as views (zero copy)."""
        if n < 0 or n > self.remaining:
            raise ChainError(f"request needs {n} bytes, chain has {self.remaining} left",
                             self.head)
        out = []
        while n:
            v = self._views[self._i]
            k = min(n, len(v) - self._off)
            out.append(v[self._off:self._off + k])
            self._off += k
            n -= k
            self.remaining -= k
            self.done += k
            if self._off == len(v):
                self._i += 1
                self._off = 0
        return out

    def take_rest(self) -> list[memoryview]:
        return self.take(self.remaining)

    def skip(self, n: int) -> None:
        self.take(n)


class ChainReader(_Cursor):
    """Reads the device-readable part of a chain in order."""

    def read(self, n: int) -> bytes:
        """Copy the next ``n`` bytes (for headers; use ``take`` for data)."""
        views = self.take(n)
        if len(views) == 1:
            return bytes(views[0])
        return b"".join(bytes(v) for v in views)


class ChainWriter(_Cursor):
    """Writes the device-writable part of a chain in order; ``done`` is
    the byte count for the used ring."""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        data = memoryview(data).cast("B")
        pos = 0
        for v in self.take(len(data)):
            v[:] = data[pos:pos + len(v)]
            pos += len(v)
