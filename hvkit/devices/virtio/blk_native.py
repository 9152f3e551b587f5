"""virtio-blk's request queue served in C, on a thread of its own.

The Python device (blk.py) pops, parses and answers requests under the
GIL, one wake-up of its worker at a time: at queue depth 32 it is far from
what the disk can do. For a disk that is a plain file (exactly a
``RawFileBackend``), ``NativeBlkQueue`` hands the queue to the C engine
(``hvkit._virtio_native``, native/virtio/blk_engine.c, which shares its
io_uring, guest-RAM and file code with the NVMe accelerator's engine in
native/common/): it checks every chain as queue.py does, runs reads and
writes through io_uring with many in flight, answers everything else
synchronously, and never takes the GIL while it serves.

Notifications: while it polls the avail ring (an adaptive window after
the last request) the driver is told not to notify (VRING_USED_F_NO_NOTIFY,
or with EVENT_IDX an avail_event left behind); going to sleep it asks for
the next one. While the host has more runnable threads than CPUs the
engine does not spin (the core it would take is often the vCPU's): it
polls by timed sleeps through the same window, so the driver's next
requests still cost it no exit. With I/O in flight and nothing new it
blocks on the io_uring ring, notifications still off: what the driver adds
meanwhile is taken at the next completion. Interrupts honour used_event / NO_INTERRUPT; the engine writes an
eventfd that the device's worker turns into ``transport.signal_queue``, so
MSI-X masking, the ISR and INTx stay the transport's business.

The queue's positions live in the engine while it runs: ``stop()`` waits
for the I/O in flight, answers it, and writes the positions back into the
``Virtqueue``, so ``state()`` and a restore see them.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable

from hvkit.devices.virtio.queue import Virtqueue
from hvkit.devices.virtio.worker import drain_eventfd, new_eventfd
from hvkit.errors import ConfigError
from hvkit.memory.guest import GuestMemory
from hvkit.storage.backend import BlockBackend

log = logging.getLogger(__name__)

ENGINES = ("auto", "native", "python")
#: how long the engine polls the avail ring after a request, at most
POLL_US = 200
PAGE = 4096


def native_unavailable(backend: BlockBackend, mem: GuestMemory) -> str | None:
    """Why the C engine cannot serve this disk (None: it can). Only the
    exact RawFileBackend qualifies: a subclass (a guarded or instrumented
    backend) may add checks the C path would skip."""
    try:
        import hvkit._virtio_native  # noqa: F401
    except ImportError as exc:
        return f"hvkit._virtio_native does not import ({exc})"
    from hvkit.storage.raw import RawFileBackend
    if type(backend) is not RawFileBackend:
        return f"backend {type(backend).__name__} is not a plain file"
    for region in mem:
        if region.mapping is None:
            return f"memory region {region.name!r} is not mapped"
    return None


def choose_engine(engine: str | None, backend: BlockBackend, mem: GuestMemory,
                  threaded: bool) -> bool:
    """True to serve the queue in C. ``engine`` (default: the environment's
    HVKIT_VIRTIO_BLK_ENGINE, else "auto") is "auto", "native" (refuse to
    go on without it) or "python"."""
    engine = engine or os.environ.get("HVKIT_VIRTIO_BLK_ENGINE", "auto")
    if engine not in ENGINES:
        raise ConfigError(f"virtio-blk: engine {engine!r} is not one of {', '.join(ENGINES)}")
    if engine == "python":
        return False
    why = "the device is not threaded" if not threaded else native_unavailable(backend, mem)
    if why is None:
        return True
    if engine == "native":
        raise ConfigError(f"virtio-blk: native engine unavailable: {why}")
    log.info("virtio-blk: Python queue engine (%s)", why)
    return False


class NativeBlkQueue:
    """The C engine serving one virtio-blk queue on its own fd of the
    disk's file. ``irq_fd`` fires when the driver wants an interrupt;
    ``exit_fd`` when the engine stopped by itself (the ring broke)."""

    def __init__(self, mem: GuestMemory, backend: BlockBackend, *, read_only: bool,
                 serial: bytes, max_segments: int, max_discard_sectors: int,
                 poll_us: int = POLL_US) -> None:
        self.mem = mem
        self.path = backend.path
        self.size = backend.size
        self.read_only = read_only
        self.direct = bool(backend.direct)
        self.align = backend.align if self.direct else 1
        self.serial = serial
        self.max_segments = max_segments
        self.max_discard_sectors = max_discard_sectors
        self.poll_ns = poll_us * 1000
        self.poll_always = os.environ.get("HVKIT_VIRTIO_BLK_POLL") == "always"
        self.irq_fd = new_eventfd()
        self.exit_fd = new_eventfd()
        self._stop_fd = new_eventfd()
        self._fd = -1
        self._engine: Any = None
        self._thread: threading.Thread | None = None
        #: why the engine stopped by itself ("" while it runs or was stopped)
        self.failure = ""
        #: the last engine's counters and loop statistics
        self.stats: dict[str, int] = {}
        self.run_stats: dict[str, Any] = {}

    @property
    def running(self) -> bool:
        return self._thread is not None

    def live_stats(self) -> dict[str, int]:
        """The running engine's counters (empty when stopped: ``stop``
        leaves the last ones in ``stats``)."""
        eng = self._engine
        return eng.stats if eng is not None else {}

    def start(self, q: Virtqueue, kick_fd: int) -> None:
        """Serve ``q`` (ready) from its current positions; ``kick_fd`` is
        the queue's notification eventfd."""
        from hvkit._virtio_native import BlkEngine
        if self._thread is not None:
            return
        if self._fd < 0:
            flags = (os.O_RDONLY if self.read_only else os.O_RDWR) | os.O_CLOEXEC
            if self.direct:
                flags |= os.O_DIRECT
            self._fd = os.open(self.path, flags)
        eng = BlkEngine(self._fd, self.size, self.read_only, self.align, serial=self.serial,
                        max_segments=self.max_segments,
                        max_discard_sectors=self.max_discard_sectors)
        if not eng.enable_uring():
            log.info("virtio-blk: no io_uring; synchronous I/O")
        for region in self.mem:
            if not region.read_only:
                eng.add_region(region.gpa, region.size, region.mapping)
        last_avail, used_idx, signalled = q.positions()
        eng.set_queue(q.size, q.desc_addr, q.driver_addr, q.device_addr, last_avail, used_idx,
                      signalled, q.event_idx, q.indirect)
        eng.set_fds(kick_fd, self._stop_fd, self.irq_fd)
        eng.poll_always = self.poll_always
        drain_eventfd(self._stop_fd)
        self.failure = ""
        self._engine = eng
        self._thread = threading.Thread(target=self._run, name="virtio-blk-native", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from hvkit._virtio_native import RUN_BROKEN, RUN_STOP
        eng = self._engine
        rc = eng.run(self.poll_ns)
        if rc == RUN_STOP:
            return
        if rc == RUN_BROKEN:
            self.failure = "the driver's ring is corrupt (avail index or head index)"
        else:
            self.failure = f"engine loop failed: {os.strerror(-rc)}"
        os.eventfd_write(self.exit_fd, 1)

    def stop(self, q: Virtqueue) -> None:
        """Stop serving: the I/O in flight is answered first, and the
        queue's positions go back into ``q``."""
        thread = self._thread
        if thread is None:
            return
        os.eventfd_write(self._stop_fd, 1)
        thread.join()
        self._thread = None
        eng = self._engine
        self._engine = None
        q.set_positions(*eng.positions)
        if eng.broken:
            q.broken = True
        # the pages the engine wrote count as host writes (a view is one),
        # for the diff snapshots that track them
        for gpa in eng.take_written():
            self.mem.view(gpa, PAGE).release()
        self.stats = eng.stats
        self.run_stats = eng.run_stats

    def close(self) -> None:
        """After ``stop``."""
        for fd in (self.irq_fd, self.exit_fd, self._stop_fd, self._fd):
            if fd >= 0:
                os.close(fd)
        self.irq_fd = self.exit_fd = self._stop_fd = self._fd = -1


def on_event(fd: int, handler: Callable[[], None]) -> Callable[[int], None]:
    """A worker callback that drains ``fd`` and calls ``handler``."""
    def callback(_mask: int) -> None:
        drain_eventfd(fd)
        handler()
    return callback
