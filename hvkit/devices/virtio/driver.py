"""A small virtio driver in Python that plays the guest.

It lays out split rings in guest memory, builds descriptor chains (direct
or indirect), publishes them, notifies through the transport's registers
exactly as Linux does (virtio-mmio or virtio-pci), and reads the used ring.
Tests drive devices with it without KVM; it also lets a test build the
hostile tables a real driver never would (``raw_descriptor``, ``publish``).
"""
from __future__ import annotations

import struct
import time
from typing import Callable, Sequence

from hvkit.devices.virtio import spec as V
from hvkit.memory.guest import GuestMemory


class Allocator:
    """A bump allocator over a window of guest memory."""

    def __init__(self, base: int, end: int) -> None:
        self.next = base
        self.end = end

    def alloc(self, size: int, align: int = 16) -> int:
        addr = -(-self.next // align) * align
        if addr + size > self.end:
            raise MemoryError("driver allocator is out of guest memory")
        self.next = addr + size
        return addr


class DriverQueue:
    """The driver's half of one split virtqueue."""

    def __init__(self, mem: GuestMemory, alloc: Allocator, index: int, size: int) -> None:
        self.mem = mem
        self.alloc = alloc
        self.index = index
        self.size = size
        self.desc = alloc.alloc(V.DESC_SIZE * size, 16)
        self.avail = alloc.alloc(6 + 2 * size, 2)
        self.used = alloc.alloc(6 + 8 * size, 4)
        for addr, n in ((self.desc, V.DESC_SIZE * size), (self.avail, 6 + 2 * size),
                        (self.used, 6 + 8 * size)):
            mem.fill(addr, n)
        self.free = list(range(size))
        self.avail_idx = 0
        self.last_used = 0
        #: head -> (descriptor indexes, writable buffers [(gpa, len)])
        self.inflight: dict[int, tuple[list[int], list[tuple[int, int]]]] = {}

    # -- descriptors ------------------------------------------------------------

    def raw_descriptor(self, index: int, addr: int, length: int, flags: int, nxt: int,
                       table: int | None = None) -> None:
        base = self.desc if table is None else table
        self.mem.write(base + V.DESC_SIZE * index, struct.pack("<QIHH", addr, length, flags, nxt))

    def buffers(self, out: Sequence[bytes], in_sizes: Sequence[int]) -> list[tuple[int, int, int]]:
        """Place ``out`` in guest memory and reserve ``in_sizes``; returns
        (addr, len, flags) per buffer."""
        bufs = []
        for data in out:
            addr = self.alloc.alloc(max(len(data), 1))
            self.mem.write(addr, data)
            bufs.append((addr, len(data), 0))
        for n in in_sizes:
            addr = self.alloc.alloc(max(n, 1))
            self.mem.fill(addr, max(n, 1), 0xEE)
            bufs.append((addr, n, V.DESC_F_WRITE))
        return bufs

    def add(self, out: Sequence[bytes] = (), in_sizes: Sequence[int] = (), *,
            indirect: bool = False, publish: bool = True) -> int:
        """Build a chain and (by default) make it available; returns the head."""
        bufs = self.buffers(out, in_sizes)
        writable = [(a, n) for a, n, f in bufs if f & V.DESC_F_WRITE]
        if indirect:
            table = self.alloc.alloc(V.DESC_SIZE * len(bufs), 16)
            for i, (a, n, f) in enumerate(bufs):
                more = V.DESC_F_NEXT if i + 1 < len(bufs) else 0
                self.raw_descriptor(i, a, n, f | more, i + 1, table=table)
            head = self.free.pop(0)
            self.raw_descriptor(head, table, V.DESC_SIZE * len(bufs), V.DESC_F_INDIRECT, 0)
            used = [head]
        else:
            if len(bufs) > len(self.free):
                raise MemoryError("no free descriptors")
            used = [self.free.pop(0) for _ in bufs]
            for i, (a, n, f) in enumerate(bufs):
                more = V.DESC_F_NEXT if i + 1 < len(bufs) else 0
                nxt = used[i + 1] if more else 0
                self.raw_descriptor(used[i], a, n, f | more, nxt)
            head = used[0]
        self.inflight[head] = (used, writable)
        if publish:
            self.publish(head)
        return head

    def publish(self, head: int) -> None:
        """Put ``head`` in the avail ring and bump the avail index."""
        slot = self.avail_idx % self.size
        self.mem.write_u16(self.avail + 4 + 2 * slot, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)

    def set_avail_idx(self, value: int) -> None:
        self.avail_idx = value & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)

    # -- notification suppression ---------------------------------------------------

    def set_used_event(self, value: int) -> None:
        self.mem.write_u16(self.avail + 4 + 2 * self.size, value & 0xFFFF)

    def set_no_interrupt(self, on: bool) -> None:
        self.mem.write_u16(self.avail, V.AVAIL_F_NO_INTERRUPT if on else 0)

    def avail_event(self) -> int:
        return self.mem.read_u16(self.used + 4 + 8 * self.size)

    def used_flags(self) -> int:
        return self.mem.read_u16(self.used)

    # -- completions ------------------------------------------------------------------

    def used_idx(self) -> int:
        return self.mem.read_u16(self.used + 2)

    def collect(self) -> list[tuple[int, int]]:
        """New used entries as (head, length); their descriptors are freed."""
        out = []
        idx = self.used_idx()
        while self.last_used != idx:
            slot = self.last_used % self.size
            head, length = struct.unpack("<II", self.mem.read(self.used + 4 + 8 * slot, 8))
            out.append((head, length))
            if head in self.inflight:
                used, _ = self.inflight.pop(head)
                self.free.extend(used)
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def written(self, head: int, length: int) -> bytes:
        """The first ``length`` bytes the device wrote into chain ``head``."""
        _, writable = self.inflight.get(head, ([], []))
        return self._gather(writable, length)

    def _gather(self, writable: list[tuple[int, int]], length: int) -> bytes:
        out = bytearray()
        for addr, n in writable:
            k = min(n, length - len(out))
            out += self.mem.read(addr, k)
            if len(out) >= length:
                break
        return bytes(out)

    def wait(self, count: int = 1, timeout: float = 5.0) -> list[tuple[int, int, bytes]]:
        """Wait for ``count`` completions; returns (head, len, written bytes)."""
        got: list[tuple[int, int, bytes]] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            idx = self.used_idx()
            while self.last_used != idx:
                slot = self.last_used % self.size
                head, length = struct.unpack("<II", self.mem.read(self.used + 4 + 8 * slot, 8))
                used, writable = self.inflight.pop(head, ([], []))
                self.free.extend(used)
                got.append((head, length, self._gather(writable, length)))
                self.last_used = (self.last_used + 1) & 0xFFFF
            if len(got) >= count:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue {self.index}: {len(got)} of {count} completions")
            time.sleep(0.001)
        return got


class _Driver:
    """Device initialisation (3.1.1) over a transport's registers."""

    def __init__(self, mem: GuestMemory, *, alloc_base: int = 0x10000,
                 alloc_end: int | None = None) -> None:
        self.mem = mem
        self.alloc = Allocator(alloc_base, alloc_end or mem.end)
        self.queues: dict[int, DriverQueue] = {}
        self.features = 0

    def setup(self, features: int | None = None, queue_sizes: dict[int, int] | None = None,
              *, driver_ok: bool = True) -> int:
        """Reset, negotiate (all offered features by default) and set up
        every queue; returns the negotiated features."""
        self.set_status(0)
        self.set_status(V.STATUS_ACKNOWLEDGE)
        self.set_status(V.STATUS_ACKNOWLEDGE | V.STATUS_DRIVER)
        offered = self.device_features()
        wanted = offered if features is None else features & offered
        wanted |= 1 << V.F_VERSION_1
        self.write_driver_features(wanted)
        st = V.STATUS_ACKNOWLEDGE | V.STATUS_DRIVER | V.STATUS_FEATURES_OK
        self.set_status(st)
        if not self.status() & V.STATUS_FEATURES_OK:
            raise RuntimeError("device refused the features")
        self.features = wanted
        for i in range(self.num_queues()):
            size = self.queue_max(i)
            if queue_sizes and i in queue_sizes:
                size = queue_sizes[i]
            if size:
                self.queues[i] = q = DriverQueue(self.mem, self.alloc, i, size)
                self.program_queue(q)
        if driver_ok:
            self.set_status(st | V.STATUS_DRIVER_OK)
        return wanted

    def kick(self, index: int) -> None: ...
    def set_status(self, value: int) -> None: ...
    def status(self) -> int: ...
    def device_features(self) -> int: ...
    def write_driver_features(self, value: int) -> None: ...
    def num_queues(self) -> int: ...
    def queue_max(self, index: int) -> int: ...
    def program_queue(self, q: DriverQueue) -> None: ...
    def read_config(self, offset: int, size: int) -> bytes: ...


class MmioDriver(_Driver):
    """Drives a ``VirtioMmioTransport`` through ``read``/``write``."""

    def __init__(self, transport, mem: GuestMemory, **kw) -> None:
        super().__init__(mem, **kw)
        self.t = transport

    def r32(self, off: int) -> int:
        return struct.unpack("<I", self.t.read(off, 4))[0]

    def w32(self, off: int, value: int) -> None:
        self.t.write(off, struct.pack("<I", value & 0xFFFFFFFF))

    def set_status(self, value: int) -> None:
        self.w32(0x70, value)

    def status(self) -> int:
        return self.r32(0x70)

    def device_features(self) -> int:
        self.w32(0x14, 0)
        lo = self.r32(0x10)
        self.w32(0x14, 1)
        return lo | self.r32(0x10) << 32

    def write_driver_features(self, value: int) -> None:
        for page in (0, 1):
            self.w32(0x24, page)
            self.w32(0x20, value >> (32 * page))

    def num_queues(self) -> int:
        n = 0
        while True:
            self.w32(0x30, n)
            if not self.r32(0x34):
                return n
            n += 1

    def queue_max(self, index: int) -> int:
        self.w32(0x30, index)
        return self.r32(0x34)

    def program_queue(self, q: DriverQueue) -> None:
        self.w32(0x30, q.index)
        self.w32(0x38, q.size)
        for reg, addr in ((0x80, q.desc), (0x90, q.avail), (0xA0, q.used)):
            self.w32(reg, addr)
            self.w32(reg + 4, addr >> 32)
        self.w32(0x44, 1)

    def kick(self, index: int) -> None:
        self.w32(0x50, index)

    def interrupt_status(self) -> int:
        return self.r32(0x60)

    def ack(self, bits: int) -> None:
        self.w32(0x64, bits)

    def read_config(self, offset: int, size: int) -> bytes:
        return self.t.read(0x100 + offset, size)


class PciDriver(_Driver):
    """Drives a ``VirtioPciTransport`` through BAR 0 (MSI-X as the test sets it)."""

    def __init__(self, transport, mem: GuestMemory, **kw) -> None:
        super().__init__(mem, **kw)
        self.t = transport

    def _w(self, off: int, fmt: str, value: int) -> None:
        self.t.bar_write(off, struct.pack("<" + fmt, value))

    def _r(self, off: int, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.t.bar_read(off, struct.calcsize(fmt)))[0]

    def set_status(self, value: int) -> None:
        self._w(0x14, "B", value)

    def status(self) -> int:
        return self._r(0x14, "B")

    def device_features(self) -> int:
        self._w(0x00, "I", 0)
        lo = self._r(0x04, "I")
        self._w(0x00, "I", 1)
        return lo | self._r(0x04, "I") << 32

    def write_driver_features(self, value: int) -> None:
        for page in (0, 1):
            self._w(0x08, "I", page)
            self._w(0x0C, "I", (value >> (32 * page)) & 0xFFFFFFFF)

    def num_queues(self) -> int:
        return self._r(0x12, "H")

    def queue_max(self, index: int) -> int:
        self._w(0x16, "H", index)
        return self._r(0x18, "H")

    def program_queue(self, q: DriverQueue, vector: int | None = None) -> None:
        self._w(0x16, "H", q.index)
        self._w(0x18, "H", q.size)
        if vector is not None:
            self._w(0x1A, "H", vector)
        self._w(0x20, "Q", q.desc)
        self._w(0x28, "Q", q.avail)
        self._w(0x30, "Q", q.used)
        self._w(0x1C, "H", 1)

    def notify_offset(self, index: int) -> int:
        self._w(0x16, "H", index)
        return 0x3000 + 4 * self._r(0x1E, "H")

    def kick(self, index: int) -> None:
        self.t.bar_write(self.notify_offset(index), struct.pack("<H", index))

    def read_config(self, offset: int, size: int) -> bytes:
        return self.t.bar_read(0x2000 + offset, size)


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.001)
