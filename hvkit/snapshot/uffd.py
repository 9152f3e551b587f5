"""Lazy restore: guest pages filled from the snapshot on first touch.

A userfaultfd covers each anonymous RAM region; when the guest (or KVM on
its behalf) touches a missing page, the kernel parks the access and this
pager's thread reads the block around it from the memory file and places
it with UFFDIO_COPY (UFFDIO_ZEROPAGE where the file has a hole). Blocks
are ``block`` bytes (64 KiB by default), so one fault brings a block's
neighbours with it.
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
    from hvkit.memory.guest import GuestMemory

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


class LazyPager:
    """Serves the missing pages of ``memory`` from ``path``."""

    def __init__(self, memory: "GuestMemory", path: str, regions: list[dict],
                 block: int = 64 << 10) -> None:
        if block % PAGE or block <= 0:
            raise SnapshotError(f"lazy block {block} is not a multiple of {PAGE}")
        fd = _libc.syscall(SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
        if fd < 0:
            err = ctypes.get_errno()
            raise SnapshotError(f"lazy restore needs userfaultfd: {os.strerror(err)} "
                                "(root, or vm.unprivileged_userfaultfd=1)")
        self.uffd = fd
        self.block = block
        self.stats = PagerStats()
        self.file = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._buf = bytearray(block)
        from hvkit import _native
        self._buf_addr = _native.buffer_address(self._buf)
        # (host start, host end, file offset, region size) per region
        self.ranges: list[tuple[int, int, int, int]] = []
        try:
            api = bytearray(struct.pack("<QQQ", UFFD_API, 0, 0))
            _ioctl(fd, UFFDIO_API, api)
            by_gpa = {r["gpa"]: r for r in regions}
            for region in memory:
                saved = by_gpa[region.gpa]
                reg = bytearray(struct.pack("<QQQQ", region.hva, region.size,
                                            UFFDIO_REGISTER_MODE_MISSING, 0))
                _ioctl(fd, UFFDIO_REGISTER, reg)
                self.ranges.append((region.hva, region.hva + region.size, saved["offset"],
                                    region.size))
        except (OSError, KeyError) as exc:
            self.close()
            raise SnapshotError(f"cannot set up lazy restore: {exc}") from None
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._serve, name="hvkit-uffd", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
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
                        self._fill(address)

    def _fill(self, address: int) -> None:
        for start, end, offset, size in self.ranges:
            if start <= address < end:
                break
        else:
            return           # not ours: cannot happen for a registered range
        rel = (address - start) // self.block * self.block
        n = min(self.block, size - rel)
        got = os.preadv(self.file, [memoryview(self._buf)[:n]], offset + rel)
        if got < n:
            self._buf[got:n] = bytes(n - got)
        self.stats.bytes_read += got
        dst = start + rel
        if not any(memoryview(self._buf)[:n]):
            req = bytearray(struct.pack("<QQQq", dst, n, 0, 0))
            self._place(UFFDIO_ZEROPAGE, req, dst, n)
            self.stats.blocks_zeroed += 1
        else:
            req = bytearray(struct.pack("<QQQQq", dst, self._buf_addr, n, 0, 0))
            self._place(UFFDIO_COPY, req, dst, n)
            self.stats.blocks_copied += 1

    def _place(self, request: int, req: bytearray, dst: int, n: int) -> None:
        try:
            _ioctl(self.uffd, request, req)
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise
            # Part of the block is there already (another fault won): place
            # the missing pages one by one.
            for page in range(dst, dst + n, PAGE):
                one = bytearray(req)
                struct.pack_into("<Q", one, 0, page)
                if request == UFFDIO_COPY:
                    struct.pack_into("<QQ", one, 8, self._buf_addr + (page - dst), PAGE)
                else:
                    struct.pack_into("<Q", one, 8, PAGE)
                try:
                    _ioctl(self.uffd, request, one)
                except OSError as e:
                    if e.errno != errno.EEXIST:
                        raise

    def close(self) -> None:
        if getattr(self, "_thread", None) is not None:
            os.write(self._stop_w, b"q")
            self._thread.join(5)
            self._thread = None
            os.close(self._stop_r)
            os.close(self._stop_w)
        if self.uffd >= 0:
            os.close(self.uffd)
            self.uffd = -1
        if self.file >= 0:
            os.close(self.file)
            self.file = -1
