"""Lazy restore: guest pages filled from the snapshot on first touch.

A userfaultfd covers each anonymous RAM region; when the guest (or KVM on
its behalf) touches a missing page, the kernel parks the access and this
pager's thread reads the block around it from the memory file and places
it with UFFDIO_COPY (UFFDIO_ZEROPAGE where the block is all zero). Blocks
are ``block`` bytes (64 KiB by default), so one fault brings a block's
neighbours with it. The pages come from a page provider
(hvkit.snapshot.pages), so any source can serve them.
"""
from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hvkit.snapshot.format import PAGE, SnapshotError

if TYPE_CHECKING:
    from typing import Sequence

    from hvkit.memory.guest import GuestMemory
    from hvkit.snapshot.pages import PageProvider

SYS_USERFAULTFD = 323          # x86-64
UFFD_API = 0xAA
UFFDIO = 0xAA
UFFD_EVENT_PAGEFAULT = 0x12
UFFDIO_REGISTER_MODE_MISSING = 1


def _iowr(nr: int, size: int) -> int:
    return 3 << 30 | size << 16 | UFFDIO << 8 | nr


UFFDIO_API = _iowr(0x3F, 24)
UFFDIO_REGISTER = _iowr(0x00, 32)
UFFDIO_COPY = _iowr(0x03, 40)
UFFDIO_ZEROPAGE = _iowr(0x04, 32)
MSG = struct.Struct("<B3xI QQI4x")      # uffd_msg: event, ..., pagefault flags, address, ptid

_ZERO = bytes(1 << 20)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _ioctl(fd: int, request: int, buf: bytearray) -> None:
    import fcntl
    fcntl.ioctl(fd, request, buf, True)


@dataclass
class PagerStats:
    faults: int = 0
    blocks_copied: int = 0
    blocks_zeroed: int = 0
    bytes_read: int = 0
    prefetched: int = 0


class LazyPager:
    """Serves the missing pages of ``memory`` from a page provider.

    ``prefetch``: (region number, offset) blocks to place first, in order,
    from a thread of their own while the guest runs (the blocks the last
    run touched: see ``touched``). Every block the guest faults on is
    recorded in ``touched``, in the order of the faults."""

    def __init__(self, memory: "GuestMemory", provider: "PageProvider",
                 block: int = 64 << 10,
                 prefetch: "Sequence[tuple[int, int]]" = ()) -> None:
        if block % PAGE or not 0 < block <= len(_ZERO):
            raise SnapshotError(f"lazy block {block} is not a multiple of {PAGE} "
                                f"up to {len(_ZERO)}")
        self.provider = provider
        self.uffd = -1
        self._thread: threading.Thread | None = None
        self._prefetcher: threading.Thread | None = None
        fd = _libc.syscall(SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
        if fd < 0:
            err = ctypes.get_errno()
            provider.close()
            raise SnapshotError(f"lazy restore needs userfaultfd: {os.strerror(err)} "
                                "(root, or vm.unprivileged_userfaultfd=1)")
        self.uffd = fd
        self.block = block
        self.stats = PagerStats()
        self.touched: list[tuple[int, int]] = []
        self._closing = False
        self._memory = memory
        self._host_buf: "_Block | None" = None
        self._host_lock = threading.Lock()
        # (host start, host end, region size) per region, in table order
        self.ranges: list[tuple[int, int, int]] = []
        try:
            api = bytearray(struct.pack("<QQQ", UFFD_API, 0, 0))
            _ioctl(fd, UFFDIO_API, api)
            for region in memory:
                reg = bytearray(struct.pack("<QQQQ", region.hva, region.size,
                                            UFFDIO_REGISTER_MODE_MISSING, 0))
                _ioctl(fd, UFFDIO_REGISTER, reg)
                self.ranges.append((region.hva, region.hva + region.size, region.size))
            # one byte per block: 1 once the block is in (never cleared)
            self.placed = [bytearray(-(-size // block)) for _, _, size in self.ranges]
            self.gpas = [region.gpa for region in memory]
        except OSError as exc:
            self.close()
            raise SnapshotError(f"cannot set up lazy restore: {exc}") from None
        memory.set_access_hook(self._host_access)
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._serve, name="hvkit-uffd", daemon=True)
        self._thread.start()
        blocks = [(r, o) for r, o in prefetch
                  if 0 <= r < len(self.ranges) and 0 <= o < self.ranges[r][2] and o % block == 0]
        if blocks:
            self._prefetcher = threading.Thread(target=self._prefetch, args=(blocks,),
                                                name="hvkit-uffd-prefetch", daemon=True)
            self._prefetcher.start()

    def _serve(self) -> None:
        buf = _Block(self.block)
        poller = select.poll()
        poller.register(self.uffd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd == self._stop_r:
                    return
                try:
                    raw = os.read(self.uffd, MSG.size * 16)
                except BlockingIOError:
                    continue
                except OSError:
                    return
                for i in range(0, len(raw) - MSG.size + 1, MSG.size):
                    event, _, _, address, _ = MSG.unpack_from(raw, i)
                    if event == UFFD_EVENT_PAGEFAULT:
                        self.stats.faults += 1
                        self._fault(address, buf)

    def _fault(self, address: int, buf: "_Block") -> None:
        for index, (start, end, _) in enumerate(self.ranges):
            if start <= address < end:
                break
        else:
            return           # not ours: cannot happen for a registered range
        rel = (address - start) // self.block * self.block
        self.touched.append((index, rel))
        self._fill(index, rel, buf)

    def _host_access(self, gpa: int, size: int) -> None:
        """Bring in the blocks of a host access from the calling thread."""
        for index, base in enumerate(self.gpas):
            rsize = self.ranges[index][2]
            lo, hi = max(gpa, base), min(gpa + size, base + rsize)
            if lo >= hi:
                continue
            placed = self.placed[index]
            for b in range((lo - base) // self.block, (hi - 1 - base) // self.block + 1):
                if not placed[b]:
                    with self._host_lock:
                        if self._host_buf is None:
                            self._host_buf = _Block(self.block)
                        self._fill(index, b * self.block, self._host_buf)

    def _prefetch(self, blocks: "list[tuple[int, int]]") -> None:
        buf = _Block(self.block)
        for index, rel in blocks:
            if self._closing:
                return
            try:
                if self._fill(index, rel, buf, skip_present=True):
                    self.stats.prefetched += 1
            except OSError:
                return       # the VM is going away

    def _fill(self, index: int, rel: int, buf: "_Block", skip_present: bool = False) -> bool:
        if self.placed[index][rel // self.block]:
            return False
        start, _, size = self.ranges[index]
        n = min(self.block, size - rel)
        view = buf.view[:n]
        self.provider.read(index, rel, view)
        self.stats.bytes_read += n
        dst = start + rel
        if buf.data[:n] == _ZERO[:n]:
            req = bytearray(struct.pack("<QQQq", dst, n, 0, 0))
            placed = self._place(UFFDIO_ZEROPAGE, req, dst, n, buf.address, skip_present)
            self.stats.blocks_zeroed += 1
        else:
            req = bytearray(struct.pack("<QQQQq", dst, buf.address, n, 0, 0))
            placed = self._place(UFFDIO_COPY, req, dst, n, buf.address, skip_present)
            self.stats.blocks_copied += 1
        if not skip_present or placed:
            self.placed[index][rel // self.block] = 1
        return placed

    def _place(self, request: int, req: bytearray, dst: int, n: int, src: int,
               skip_present: bool) -> bool:
        try:
            _ioctl(self.uffd, request, req)
            return True
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise
            if skip_present:
                return False
            # Part of the block is there already (the prefetcher won): place
            # the missing pages one by one.
            for page in range(dst, dst + n, PAGE):
                one = bytearray(req)
                struct.pack_into("<Q", one, 0, page)
                if request == UFFDIO_COPY:
                    struct.pack_into("<QQ", one, 8, src + (page - dst), PAGE)
                else:
                    struct.pack_into("<Q", one, 8, PAGE)
                try:
                    _ioctl(self.uffd, request, one)
                except OSError as e:
                    if e.errno != errno.EEXIST:
                        raise
            return True

    def close(self) -> None:
        self._closing = True
        self._memory.set_access_hook(None)
        if self._prefetcher is not None:
            self._prefetcher.join(5)
            self._prefetcher = None
        if self._thread is not None:
            os.write(self._stop_w, b"q")
            self._thread.join(5)
            self._thread = None
            os.close(self._stop_r)
            os.close(self._stop_w)
        if self.uffd >= 0:
            os.close(self.uffd)
            self.uffd = -1
        if self.provider is not None:
            self.provider.close()
            self.provider = None  # type: ignore[assignment]


class _Block:
    """A block-sized buffer and its address, one per pager thread."""

    def __init__(self, size: int) -> None:
        from hvkit import _native
        self.data = bytearray(size)
        self.view = memoryview(self.data)
        self.address = _native.buffer_address(self.data)
