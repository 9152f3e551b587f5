"""virtio-blk (virtio 1.2, 5.2) on any hvkit BlockBackend.

One request queue, served on the device's worker thread. Data moves
between the backend and guest RAM through memoryviews of the request's
buffers (no bounce through Python bytes). Reads and writes may run on a
small pool of I/O threads (``io_threads``; on by default for raw files,
whose I/O is plain pread/pwrite), so a queue depth of 32 keeps the disk
busy with up to that many requests while the worker thread goes on
popping: completions come back to the worker through an eventfd and are
pushed there, in whatever order they finish, as virtio allows. Every other
request waits until the reads and writes before it are done. Every request is checked: the
header and status byte must be there, lengths are whole 512-byte sectors,
ranges lie inside the disk, writes to a read-only disk fail; a bad request
gets VIRTIO_BLK_S_IOERR, an unknown one VIRTIO_BLK_S_UNSUPP.

A disk that is a plain file (a RawFileBackend) is served by the C engine
instead (blk_native.py: the same checks and answers, io_uring, polling
with notifications suppressed), on a thread of its own from DRIVER_OK
until reset, pause or close; this module stays the reference and serves
every other backend.
"""
from __future__ import annotations

import logging
import os
import queue
import selectors
import struct
from concurrent.futures import Future, ThreadPoolExecutor

from hvkit.devices.virtio import spec as V
from hvkit.devices.virtio.blk_native import NativeBlkQueue, choose_engine, on_event
from hvkit.devices.virtio.chain import Chain, ChainError
from hvkit.devices.virtio.device import VirtioDevice
from hvkit.devices.virtio.worker import drain_eventfd, new_eventfd
from hvkit.memory.guest import GuestMemory
from hvkit.storage.backend import BlockBackend

log = logging.getLogger(__name__)

SECTOR = 512
QUEUE_SIZE = 256
ID_BYTES = 20

# feature bits (5.2.3)
F_SIZE_MAX = 1
F_SEG_MAX = 2
F_RO = 5
F_BLK_SIZE = 6
F_FLUSH = 9
F_TOPOLOGY = 10
F_DISCARD = 13
F_WRITE_ZEROES = 14

# request types and status (5.2.6)
T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_DISCARD = 11
T_WRITE_ZEROES = 13
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2

WRITE_ZEROES_UNMAP = 1
_HEADER = struct.Struct("<IIQ")
_SEGMENT = struct.Struct("<QII")
_CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")


class BlkRequestError(Exception):
    """A request the device refuses; ``status`` is what the driver sees."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


class VirtioBlk(VirtioDevice):
    device_id = V.ID_BLOCK
    pci_class = 0x018000

    def __init__(self, mem: GuestMemory, backend: BlockBackend, *, serial: str = "",
                 read_only: bool | None = None, queue_size: int = QUEUE_SIZE,
                 size_max: int = 1 << 20, max_discard_sectors: int = 1 << 22,
                 max_segments: int = 32, close_backend: bool = False,
                 io_threads: int | None = None, threaded: bool = True,
                 engine: str | None = None) -> None:
        """``io_threads``: how many reads and writes may be in flight at once
        (0: one at a time, on the worker). None picks 8 for a RawFileBackend
        and 0 for other backends, which may not take concurrent calls.
        ``engine``: "auto" (default; the C engine where the backend is a
        plain file), "native" (refuse otherwise) or "python"; the
        environment's HVKIT_VIRTIO_BLK_ENGINE when None."""
        self.backend = backend
        self.close_backend = close_backend
        self.read_only = backend.read_only if read_only is None else read_only or backend.read_only
        self.serial = (serial or "hvkit").encode()[:ID_BYTES]
        self.seg_max = queue_size - 2
        self.size_max = size_max
        self.max_discard_sectors = max_discard_sectors
        self.max_segments = max_segments
        self.capacity = backend.size // SECTOR
        features = ((1 << F_SIZE_MAX) | (1 << F_SEG_MAX) | (1 << F_BLK_SIZE)
                    | (1 << F_FLUSH) | (1 << F_TOPOLOGY))
        if self.read_only:
            features |= 1 << F_RO
        else:
            features |= (1 << F_DISCARD) | (1 << F_WRITE_ZEROES)
        super().__init__(mem, [queue_size], features=features, threaded=threaded, name="blk")
        block = backend.block_size
        align = max(block // SECTOR, 1)
        self.config = bytearray(_CONFIG.pack(
            self.capacity, size_max, self.seg_max,
            0, 0, 0,                                  # geometry: none
            block,
            0, 0, 1, 0,                               # topology: exp, offset, min_io, opt_io
            0, 0, 1,                                  # writeback, unused, num_queues
            max_discard_sectors, max_segments, align,
            max_discard_sectors, max_segments, 0))
        self._answered = {S_OK: 0, S_IOERR: 0, S_UNSUPP: 0}
        if io_threads is None:
            from hvkit.storage.raw import RawFileBackend
            io_threads = 8 if isinstance(backend, RawFileBackend) else 0
        if not threaded:
            io_threads = 0
        self.io_threads = io_threads
        self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="virtio-blk-io") \
            if io_threads > 0 else None
        self._inflight: set[Future] = set()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._done_fd = new_eventfd()
        self._generation = 0
        self.worker.register(self._done_fd, selectors.EVENT_READ, self._completions)
        self.native: NativeBlkQueue | None = None
        if choose_engine(engine, backend, mem, threaded):
            self.native = NativeBlkQueue(
                mem, backend, read_only=self.read_only, serial=self.serial,
                max_segments=max_segments, max_discard_sectors=max_discard_sectors)
            self.worker.register(self.native.irq_fd, selectors.EVENT_READ,
                                 on_event(self.native.irq_fd, self._native_interrupt))
            self.worker.register(self.native.exit_fd, selectors.EVENT_READ,
                                 on_event(self.native.exit_fd, self._native_exited))

    @property
    def completed(self) -> dict[int, int]:
        """Requests answered with each status (Python and C engines), for
        tests and metrics."""
        out = dict(self._answered)
        live = self.native.live_stats() if self.native is not None else {}
        for status, key in ((S_OK, "ok"), (S_IOERR, "ioerr"), (S_UNSUPP, "unsupp")):
            out[status] += live.get(key, 0)
        return out

    # -- the C engine -------------------------------------------------------------

    def on_activate(self) -> None:
        self._start_native()

    def _start_native(self) -> None:
        """Hand queue 0 to the C engine (lock held): its notifications go
        to the engine, not to the worker."""
        native = self.native
        q = self.queues[0]
        if native is None or native.running or not self.active or not q.ready or q.broken:
            return
        self.worker.unregister(self.notify_fd(0))
        try:
            native.start(q, self.notify_fd(0))
        except (OSError, ValueError) as exc:
            # the disk cannot be opened again as the engine needs, or the
            # rings are not where it can map them: the Python engine serves
            log.warning("virtio-blk: native engine unavailable (%s); Python engine", exc)
            self.worker.register(self.notify_fd(0), selectors.EVENT_READ, self._notified)

    def _stop_native(self, worker_takes_over: bool = True) -> None:
        """Take queue 0 back (lock held): what is in flight is answered and
        the positions are the Virtqueue's again."""
        native = self.native
        if native is None or not native.running:
            return
        native.stop(self.queues[0])
        st = native.stats
        for status, key in ((S_OK, "ok"), (S_IOERR, "ioerr"), (S_UNSUPP, "unsupp")):
            self._answered[status] += st[key]
        self.queues[0].errors += st["chain_errors"]
        fd = self.notify_fd(0)
        if worker_takes_over and not self.worker.registered(fd):
            self.worker.register(fd, selectors.EVENT_READ, self._notified)
        if native.failure and worker_takes_over:
            self.needs_reset(f"queue 0: {native.failure}")

    def _notified(self, _mask: int) -> None:
        drain_eventfd(self.notify_fd(0))
        self.serve(0)

    def _native_interrupt(self) -> None:
        if self.transport is not None:
            self.transport.signal_queue(0)

    def _native_exited(self) -> None:
        """The engine stopped by itself: the ring broke (NEEDS_RESET)."""
        if self.native is not None and self.native.failure:
            self._stop_native()

    def reset(self) -> None:
        """The engine lets go of the rings before they are reset."""
        with self.lock:
            self._stop_native()
            super().reset()

    def pause(self) -> None:
        with self.lock:
            self._stop_native()
        self._pause_python()

    def resume(self) -> None:
        super().resume()
        with self.lock:
            self._start_native()

    # -- the queue ----------------------------------------------------------------

    def process_queue(self, index: int) -> None:
        if self.native is not None and self.native.running:
            return                          # the C engine has the ring
        if self._pool is None:
            self.drain(index, self._request)
            return
        q = self.queues[index]
        while self.active:
            q.disable_notification()
            for chain in self.chains(index):
                if _is_data(chain) and len(self._inflight) < 4 * self.io_threads:
                    fut = self._pool.submit(self._request_io, chain, self._generation)
                    self._inflight.add(fut)
                    fut.add_done_callback(self._inflight.discard)
                else:
                    self._wait_inflight()
                    self._push_done()
                    q.push(chain.head, self._request(chain))
            if not q.enable_notification():
                break
        self._push_done()
        self.signal_used(index)

    def _request_io(self, chain: Chain, generation: int) -> None:
        """On an I/O thread: run one read or write, hand it back to the worker."""
        try:
            written, status = self._serve(chain)
        except ChainError as exc:
            log.debug("virtio-blk: %s", exc)
            written, status = 0, None
        except Exception:                   # never lose a request
            log.exception("virtio-blk: I/O thread failed")
            written, status = 0, None
        self._done.put((generation, chain.head, written, status))
        try:
            os.eventfd_write(self._done_fd, 1)
        except OSError:                     # closed under us: the device is gone
            pass

    def _completions(self, _mask: int) -> None:
        drain_eventfd(self._done_fd)
        if self._push_done():
            self.signal_used(0)

    def _push_done(self) -> int:
        """Push the finished reads and writes (worker, lock held)."""
        q = self.queues[0]
        n = 0
        while True:
            try:
                generation, head, written, status = self._done.get_nowait()
            except queue.Empty:
                return n
            if generation != self._generation or not self.active:
                continue                    # the device was reset meanwhile
            if status is None:
                q.errors += 1
            else:
                self._answered[status] += 1
            q.push(head, written)
            n += 1

    def _wait_inflight(self) -> None:
        for fut in list(self._inflight):
            fut.result()

    def _pause_python(self) -> None:
        """Reads and writes in flight finish and are answered first."""
        super().pause()
        with self.lock:
            if self._pool is not None and self.active:
                self._wait_inflight()
                if self._push_done():
                    self.signal_used(0)

    def state(self) -> dict:
        """Reads and writes in flight finish and are completed first, so a
        snapshot holds no request the device has taken but not answered."""
        with self.lock:
            if self.native is not None and self.native.running:
                self._stop_native()
                try:
                    return super().state()
                finally:
                    self._start_native()
            if self._pool is not None and self.active:
                self._wait_inflight()
                if self._push_done():
                    self.signal_used(0)
            return super().state()

    def on_reset(self) -> None:
        """Requests in flight finish first (their buffers are the driver's
        again once the reset is done), and are not completed."""
        self._wait_inflight()
        self._generation += 1
        while True:
            try:
                self._done.get_nowait()
            except queue.Empty:
                break

    def _request(self, chain: Chain) -> int:
        written, status = self._serve(chain)
        self._answered[status] += 1
        return written

    def _serve(self, chain: Chain) -> tuple[int, int]:
        """Run one request: (bytes for the used ring, status)."""
        w = chain.writer()
        if w.remaining < 1:
            raise ChainError("virtio-blk request without a status byte", chain.head)
        data_out = w.take(w.remaining - 1)
        status_view = w.take(1)[0]
        try:
            self._execute(chain, data_out)
            status = S_OK
        except BlkRequestError as exc:
            log.debug("virtio-blk: %s", exc)
            status = exc.status
        except ChainError as exc:
            log.debug("virtio-blk: %s", exc)
            status = S_IOERR
        except OSError as exc:          # StorageError is one
            log.warning("virtio-blk: backend error: %s", exc)
            status = S_IOERR
        status_view[0] = status
        # like QEMU, report the whole writable area (Linux does not read it)
        return chain.write_len, status

    def _range(self, sector: int, length: int) -> int:
        offset = sector * SECTOR
        if length % SECTOR:
            raise BlkRequestError(S_IOERR, f"length {length} is not whole sectors")
        if offset + length > self.backend.size:
            raise BlkRequestError(S_IOERR, f"sectors {sector}+{length // SECTOR} beyond "
                                           f"the disk ({self.capacity})")
        return offset

    def _execute(self, chain: Chain, data_out: list[memoryview]) -> int:
        r = chain.reader()
        rtype, _reserved, sector = _HEADER.unpack(r.read(_HEADER.size))
        out_len = sum(len(v) for v in data_out)
        backend = self.backend
        if rtype == T_IN:
            offset = self._range(sector, out_len)
            for view in data_out:
                backend.readinto(offset, view)
                offset += len(view)
            return out_len
        if rtype == T_OUT:
            data = r.take_rest()
            if self.read_only:
                raise BlkRequestError(S_IOERR, "write to a read-only disk")
            offset = self._range(sector, sum(len(v) for v in data))
            for view in data:
                backend.write(offset, view)
                offset += len(view)
            return 0
        if rtype == T_FLUSH:
            if not self.read_only:
                backend.flush()
            return 0
        if rtype == T_GET_ID:
            n = min(out_len, ID_BYTES)
            ident = self.serial.ljust(ID_BYTES, b"\0")[:n]
            pos = 0
            for view in data_out:
                k = min(len(view), n - pos)
                view[:k] = ident[pos:pos + k]
                pos += k
                if pos == n:
                    break
            return n
        if rtype in (T_DISCARD, T_WRITE_ZEROES):
            if self.read_only:
                raise BlkRequestError(S_IOERR, "discard/write-zeroes on a read-only disk")
            count = r.remaining // _SEGMENT.size
            if r.remaining % _SEGMENT.size or not 1 <= count <= self.max_segments:
                raise BlkRequestError(S_IOERR, f"{r.remaining} bytes of segments")
            segments = [_SEGMENT.unpack(r.read(_SEGMENT.size)) for _ in range(count)]
            for seg_sector, nsect, flags in segments:
                if nsect > self.max_discard_sectors:
                    raise BlkRequestError(S_IOERR, f"{nsect} sectors in one segment")
                if rtype == T_DISCARD and flags:
                    raise BlkRequestError(S_UNSUPP, "discard with flags")
                if flags & ~WRITE_ZEROES_UNMAP:
                    raise BlkRequestError(S_UNSUPP, f"segment flags {flags:#x}")
                self._range(seg_sector, nsect * SECTOR)
            for seg_sector, nsect, _flags in segments:
                if rtype == T_DISCARD:
                    backend.discard(seg_sector * SECTOR, nsect * SECTOR)
                else:
                    backend.write_zeroes(seg_sector * SECTOR, nsect * SECTOR)
            return 0
        raise BlkRequestError(S_UNSUPP, f"request type {rtype}")

    def on_close(self) -> None:
        """The backend belongs to the caller unless ``close_backend``."""
        if self.native is not None:
            self._stop_native(worker_takes_over=False)
            self.worker.unregister(self.native.irq_fd)
            self.worker.unregister(self.native.exit_fd)
            self.native.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.worker.unregister(self._done_fd)
        os.close(self._done_fd)
        if self.close_backend:
            self.backend.close()


def _is_data(chain: Chain) -> bool:
    """A read or a write (the requests the I/O threads take)."""
    try:
        rtype = struct.unpack("<I", chain.reader().read(4))[0]
    except (ChainError, struct.error):
        return False
    return rtype in (T_IN, T_OUT)


def default_serial(path: str | os.PathLike[str]) -> str:
    """A serial number (GET_ID) from a disk's file name, at most 20 bytes."""
    return os.path.basename(os.fspath(path))[:ID_BYTES]
