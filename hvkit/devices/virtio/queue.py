"""Split virtqueues (virtio 1.2, 2.7) over guest memory.

One implementation serves every device and both transports. The transport
writes the driver's choices (size, ring addresses, ready); the device pops
checked descriptor chains and pushes used entries. The rings are read and
written through memoryviews of guest RAM: nothing is copied to parse them.

Everything here comes from the guest, so everything is checked:

- ring addresses, alignment and size when the queue is enabled;
- the avail index (at most ``size`` entries ahead of the device) and every
  head index (inside the queue): a violation breaks the ring, and the device
  asks for a reset (``QueueBroken``);
- each chain: next indexes inside the table, at most as many descriptors as
  the table holds (so a loop ends), indirect tables (feature negotiated, not
  nested, not combined with NEXT, a whole number of descriptors), buffers
  inside guest RAM, readable buffers before writable ones: a violation fails
  that request only (``ChainError``).
"""
from __future__ import annotations

import struct
from typing import Any

from hvkit.devices.virtio import spec as V
from hvkit.devices.virtio.chain import Chain, ChainError, QueueBroken
from hvkit.errors import GuestMemoryError
from hvkit.memory.guest import GuestMemory

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED = struct.Struct("<II")
#: an indirect table larger than this is refused (Linux never builds one)
MAX_INDIRECT = 4096


def guest_views(mem: GuestMemory, gpa: int, length: int) -> list[memoryview]:
    """``[gpa, gpa+length)`` as views of guest RAM, one per region it
    crosses; raises GuestMemoryError if any byte is outside RAM."""
    try:
        return [mem.view(gpa, length)]
    except GuestMemoryError:
        if not mem.contains(gpa, length):
            raise
    out = []
    cur, left = gpa, length
    while left:
        region = mem.region_of(cur)
        n = min(left, region.end - cur)
        out.append(mem.view(cur, n))
        cur += n
        left -= n
    return out


class Virtqueue:
    """One split virtqueue. ``max_size`` is what the device offers."""

    def __init__(self, mem: GuestMemory, index: int, max_size: int) -> None:
        if max_size < 1 or max_size > V.QUEUE_SIZE_MAX or max_size & (max_size - 1):
            raise ValueError(f"queue size {max_size} must be a power of two <= 32768")
        self.mem = mem
        self.index = index
        self.max_size = max_size
        #: negotiated features the queue honours (set by the device on activation)
        self.event_idx = False
        self.indirect = False
        self.reset()

    # -- driver-programmed state --------------------------------------------

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.desc_addr = 0
        self.driver_addr = 0
        self.device_addr = 0
        self.last_avail = 0
        self.used_idx = 0
        self._signalled = 0
        self.broken = False
        #: chains refused as malformed since the last reset
        self.errors = 0
        self._desc: memoryview | None = None
        self._avail: memoryview | None = None
        self._used: memoryview | None = None

    def enable(self) -> None:
        """The driver set ready: check the layout and map the rings.
        Raises QueueBroken if they cannot be used."""
        size = self.size
        if size < 1 or size > self.max_size or size & (size - 1):
            raise QueueBroken(f"queue {self.index}: size {size} is not a power of two "
                              f"<= {self.max_size}")
        if self.desc_addr % V.DESC_ALIGN or self.driver_addr % V.AVAIL_ALIGN \
                or self.device_addr % V.USED_ALIGN:
            raise QueueBroken(f"queue {self.index}: misaligned ring address")
        try:
            self._desc = self.mem.view(self.desc_addr, V.DESC_SIZE * size)
            self._avail = self.mem.view(self.driver_addr, 6 + 2 * size)
            self._used = self.mem.view(self.device_addr, 6 + V.USED_ELEM_SIZE * size)
        except GuestMemoryError as exc:
            self._desc = self._avail = self._used = None
            raise QueueBroken(f"queue {self.index}: ring outside guest RAM: {exc}") from None
        self.ready = True

    def release(self) -> None:
        """Let go of the ring views (before guest RAM is unmapped)."""
        for v in (self._desc, self._avail, self._used):
            if v is not None:
                v.release()
        self._desc = self._avail = self._used = None
        self.ready = False

    # -- device side ---------------------------------------------------------

    def _avail_idx(self) -> int:
        idx = _U16.unpack_from(self._avail, 2)[0]
        if (idx - self.last_avail) & 0xFFFF > self.size:
            self.broken = True
            raise QueueBroken(f"queue {self.index}: avail idx {idx} is more than "
                              f"{self.size} ahead of {self.last_avail}")
        return idx

    def has_work(self) -> bool:
        if not self.ready or self.broken:
            return False
        return self._avail_idx() != self.last_avail

    def pending(self) -> int:
        """How many chains the driver has made available and we have not taken."""
        if not self.ready or self.broken:
            return 0
        return (self._avail_idx() - self.last_avail) & 0xFFFF

    def pop(self) -> Chain | None:
        """The next available chain, checked; None if there is none.
        Raises ChainError (the chain is consumed: push its head back with
        length 0) or QueueBroken."""
        if not self.ready or self.broken:
            return None
        if self._avail_idx() == self.last_avail:
            return None
        slot = self.last_avail % self.size
        head = _U16.unpack_from(self._avail, 4 + 2 * slot)[0]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        if head >= self.size:
            self.broken = True
            raise QueueBroken(f"queue {self.index}: head index {head} >= size {self.size}")
        return self._walk(head)

    def undo_pop(self) -> None:
        """Give the last popped chain back (the device could not serve it yet)."""
        self.last_avail = (self.last_avail - 1) & 0xFFFF

    def _walk(self, head: int) -> Chain:
        table = self._desc
        limit = self.size
        idx = head
        seen = 0
        nested = False
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        mem = self.mem
        while True:
            if idx >= limit:
                raise ChainError(f"queue {self.index}: next index {idx} outside a "
                                 f"table of {limit}", head)
            seen += 1
            if seen > limit:
                raise ChainError(f"queue {self.index}: chain from {head} loops or is "
                                 f"longer than its table ({limit})", head)
            addr, length, flags, nxt = _DESC.unpack_from(table, V.DESC_SIZE * idx)
            if flags & V.DESC_F_INDIRECT:
                if not self.indirect:
                    raise ChainError(f"queue {self.index}: indirect descriptor without "
                                     f"VIRTIO_F_INDIRECT_DESC", head)
                if nested:
                    raise ChainError(f"queue {self.index}: nested indirect table", head)
                if flags & V.DESC_F_NEXT:
                    raise ChainError(f"queue {self.index}: indirect descriptor with NEXT", head)
                if length == 0 or length % V.DESC_SIZE or length // V.DESC_SIZE > MAX_INDIRECT:
                    raise ChainError(f"queue {self.index}: indirect table of {length} bytes",
                                     head)
                try:
                    table = mem.view(addr, length)
                except GuestMemoryError:
                    raise ChainError(f"queue {self.index}: indirect table at {addr:#x} "
                                     f"outside guest RAM", head) from None
                nested = True
                limit = length // V.DESC_SIZE
                idx = 0
                seen = 0
                continue
            if length:
                try:
                    views = guest_views(mem, addr, length)
                except GuestMemoryError:
                    raise ChainError(f"queue {self.index}: buffer {addr:#x}+{length} "
                                     f"outside guest RAM", head) from None
                if flags & V.DESC_F_WRITE:
                    writable.extend(views)
                else:
                    if writable:
                        raise ChainError(f"queue {self.index}: readable buffer after a "
                                         f"writable one", head)
                    readable.extend(views)
            if not flags & V.DESC_F_NEXT:
                return Chain(head, readable, writable)
            idx = nxt

    def push(self, head: int, length: int) -> None:
        """Return chain ``head`` to the driver with ``length`` bytes written."""
        if not self.ready:
            return
        slot = self.used_idx % self.size
        _USED.pack_into(self._used, 4 + V.USED_ELEM_SIZE * slot, head,
                        min(max(length, 0), 0xFFFFFFFF))
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        _U16.pack_into(self._used, 2, self.used_idx)

    def needs_interrupt(self) -> bool:
        """Whether the driver wants an interrupt for the entries pushed since
        the last call (used_event with EVENT_IDX, else the NO_INTERRUPT flag)."""
        if not self.ready:
            return False
        new, old = self.used_idx, self._signalled
        self._signalled = new
        if new == old:
            return False
        if self.event_idx:
            used_event = _U16.unpack_from(self._avail, 4 + 2 * self.size)[0]
            return V.vring_need_event(used_event, new, old)
        return not _U16.unpack_from(self._avail, 0)[0] & V.AVAIL_F_NO_INTERRUPT

    def disable_notification(self) -> None:
        """Ask the driver not to notify (we are about to poll the ring)."""
        if self.ready and not self.event_idx:
            _U16.pack_into(self._used, 0, V.USED_F_NO_NOTIFY)

    def enable_notification(self) -> bool:
        """Ask the driver to notify on its next addition; returns True if
        work arrived meanwhile (the caller must process it, not sleep)."""
        if not self.ready or self.broken:
            return False
        if self.event_idx:
            _U16.pack_into(self._used, 4 + V.USED_ELEM_SIZE * self.size, self.last_avail)
        else:
            _U16.pack_into(self._used, 0, 0)
        return self.has_work()

    def positions(self) -> tuple[int, int, int]:
        """(last_avail, used_idx, signalled): where the device stands in the
        rings, for an engine that serves them elsewhere (blk_native.py)."""
        return self.last_avail, self.used_idx, self._signalled

    def set_positions(self, last_avail: int, used_idx: int, signalled: int) -> None:
        """Take the positions back from such an engine."""
        self.last_avail = last_avail & 0xFFFF
        self.used_idx = used_idx & 0xFFFF
        self._signalled = signalled & 0xFFFF

    # -- snapshots -------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {"size": self.size, "ready": self.ready, "desc": self.desc_addr,
                "driver": self.driver_addr, "device": self.device_addr,
                "last_avail": self.last_avail, "used_idx": self.used_idx,
                "signalled": self._signalled, "event_idx": self.event_idx,
                "indirect": self.indirect, "broken": self.broken}

    def restore(self, state: dict[str, Any]) -> None:
        self.release()
        self.reset()
        self.size = int(state["size"])
        self.desc_addr = int(state["desc"])
        self.driver_addr = int(state["driver"])
        self.device_addr = int(state["device"])
        self.event_idx = bool(state["event_idx"])
        self.indirect = bool(state["indirect"])
        if state["ready"]:
            self.enable()
        self.last_avail = int(state["last_avail"]) & 0xFFFF
        self.used_idx = int(state["used_idx"]) & 0xFFFF
        self._signalled = int(state["signalled"]) & 0xFFFF
        self.broken = bool(state["broken"])
