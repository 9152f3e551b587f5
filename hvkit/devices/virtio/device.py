"""What every virtio device shares, whatever its transport.

The device status state machine (3.1), feature negotiation, the queues,
the device-specific configuration space and the worker thread live here,
so the MMIO and PCI transports are only register layouts over this object.
A transport attaches itself with ``attach(transport)`` and is then told to
raise interrupts through ``signal_queue(i)`` / ``signal_config()``; the
device never knows KVM.

Queue notifications never do work on the caller's thread: ``notify(i)``
writes to the queue's eventfd (``notify_fd(i)``, which the machine may also
register as a KVM ioeventfd) and the device's worker thread serves the
queue. ``threaded=False`` serves it synchronously instead, for tests and
for embedders that bring their own thread.
"""
from __future__ import annotations

import logging
import os
import selectors
import threading
from typing import Any, Callable, Iterator, Protocol, Sequence

from hvkit.devices.virtio import spec as V
from hvkit.devices.virtio.chain import Chain, ChainError, QueueBroken
from hvkit.devices.virtio.queue import Virtqueue
from hvkit.devices.virtio.worker import Worker, drain_eventfd, new_eventfd
from hvkit.memory.guest import GuestMemory

log = logging.getLogger(__name__)

#: features every hvkit virtio device offers (no ACCESS_PLATFORM, no packed ring)
COMMON_FEATURES = (1 << V.F_VERSION_1) | (1 << V.F_INDIRECT_DESC) | (1 << V.F_EVENT_IDX)


class VirtioTransport(Protocol):
    """How a device raises interrupts (the transport knows the mechanism)."""

    def signal_queue(self, index: int) -> None: ...

    def signal_config(self) -> None: ...

    def device_reset(self) -> None: ...


class VirtioDevice:
    """Base class of hvkit's virtio device models.

    Subclasses set ``device_id`` (and ``pci_class``), pass their queue
    sizes and device feature bits, keep their configuration space in
    ``self.config`` and implement ``process_queue``.
    """

    device_id = 0
    #: PCI class code when the device sits on virtio-pci
    pci_class = 0xFF0000

    def __init__(self, mem: GuestMemory, queue_sizes: Sequence[int], *,
                 features: int = 0, threaded: bool = True, name: str = "") -> None:
        self.mem = mem
        self.name = name or type(self).__name__.lower()
        self.queues = [Virtqueue(mem, i, size) for i, size in enumerate(queue_sizes)]
        self.avail_features = features | COMMON_FEATURES
        self.driver_features = 0
        self.status = 0
        self.config_generation = 0
        self.config = bytearray()
        self.lock = threading.RLock()
        self.transport: VirtioTransport | None = None
        self.threaded = threaded
        self.active = False
        #: why the device last asked for a reset (status NEEDS_RESET)
        self.reset_reason = ""
        #: unexpected exceptions while serving a queue (each one also resets the device)
        self.internal_errors = 0
        self._notify_fds = [new_eventfd() for _ in self.queues]
        self.worker = Worker(f"virtio-{self.name}", self.lock)
        for i, fd in enumerate(self._notify_fds):
            self.worker.register(fd, selectors.EVENT_READ, self._queue_kicked(i, fd))
        self.closed = False

    # -- wiring --------------------------------------------------------------

    def attach(self, transport: VirtioTransport) -> None:
        self.transport = transport

    @property
    def num_queues(self) -> int:
        return len(self.queues)

    def notify_fd(self, index: int) -> int:
        """The eventfd the worker waits on for queue ``index``: register it
        as an ioeventfd on the queue's notify address to skip the VMM."""
        return self._notify_fds[index]

    # -- features --------------------------------------------------------------

    def device_features_page(self, page: int) -> int:
        if not 0 <= page <= 1:
            return 0
        return (self.avail_features >> (32 * page)) & 0xFFFFFFFF

    def set_driver_features_page(self, page: int, value: int) -> None:
        with self.lock:
            if self.status & V.STATUS_FEATURES_OK or not 0 <= page <= 1:
                return
            shift = 32 * page
            self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) \
                | ((value & 0xFFFFFFFF) << shift)

    def driver_features_page(self, page: int) -> int:
        if not 0 <= page <= 1:
            return 0
        return (self.driver_features >> (32 * page)) & 0xFFFFFFFF

    def negotiated(self, bit: int) -> bool:
        return bool(self.driver_features >> bit & 1)

    def check_features(self, features: int) -> bool:
        """Device-specific refusal of a feature set (override)."""
        return True

    # -- status ------------------------------------------------------------------

    def set_status(self, value: int) -> None:
        """The driver wrote the status register (0 resets the device)."""
        with self.lock:
            value &= 0xFF
            if value == 0:
                self.reset()
                return
            keep = self.status & V.STATUS_DEVICE_NEEDS_RESET
            new = (value & ~V.STATUS_DEVICE_NEEDS_RESET) | keep
            if new & V.STATUS_FEATURES_OK and not self.status & V.STATUS_FEATURES_OK:
                f = self.driver_features
                if f & ~self.avail_features or not f >> V.F_VERSION_1 & 1 \
                        or not self.check_features(f):
                    new &= ~V.STATUS_FEATURES_OK
            going_live = new & V.STATUS_DRIVER_OK and not self.status & V.STATUS_DRIVER_OK
            self.status = new
            if going_live and not new & V.STATUS_FAILED:
                self._activate()

    def enable_queue(self, index: int) -> None:
        """The driver set queue ``index`` ready."""
        with self.lock:
            q = self.queues[index]
            if q.ready:
                return
            self._queue_features(q)
            try:
                q.enable()
            except QueueBroken as exc:
                self.needs_reset(str(exc))

    def _queue_features(self, q: Virtqueue) -> None:
        q.event_idx = self.negotiated(V.F_EVENT_IDX)
        q.indirect = self.negotiated(V.F_INDIRECT_DESC)

    def _activate(self) -> None:
        if self.closed:
            return
        if not self.status & V.STATUS_FEATURES_OK:
            self.needs_reset("DRIVER_OK without FEATURES_OK")
            return
        for q in self.queues:
            self._queue_features(q)
        self.active = True
        try:
            self.on_activate()
        except Exception as exc:
            log.exception("%s: activation failed", self.name)
            self.needs_reset(f"activation failed: {exc}")
            return
        if self.threaded:
            self.worker.start()
        for i, q in enumerate(self.queues):
            if q.ready:
                self.notify(i)

    def needs_reset(self, reason: str) -> None:
        """Stop serving and tell the driver (DEVICE_NEEDS_RESET + a
        configuration change interrupt), as the spec asks of a device that
        met an error it cannot recover from."""
        with self.lock:
            log.warning("%s: needs reset: %s", self.name, reason)
            self.reset_reason = reason
            self.active = False
            already = self.status & V.STATUS_DEVICE_NEEDS_RESET
            self.status |= V.STATUS_DEVICE_NEEDS_RESET
            if not already and self.status & V.STATUS_DRIVER_OK and self.transport:
                self.transport.signal_config()

    def reset(self) -> None:
        """Device reset: queues, features and status back to their initial
        values; host-side state (connections, buffers) dropped."""
        with self.lock:
            self.active = False
            for q in self.queues:
                q.release()
                q.reset()
            self.driver_features = 0
            self.status = 0
            self.reset_reason = ""
            for fd in self._notify_fds:
                drain_eventfd(fd)
            try:
                self.on_reset()
            except Exception:
                log.exception("%s: reset hook failed", self.name)
            if self.transport is not None:
                self.transport.device_reset()

    # -- configuration space -------------------------------------------------------

    def read_config(self, offset: int, size: int) -> bytes:
        with self.lock:
            if offset < 0 or size <= 0:
                return bytes(max(size, 0))
            data = bytes(self.config[offset:offset + size])
            return data + bytes(size - len(data))

    def write_config(self, offset: int, data: bytes) -> None:
        """Most configuration fields are read-only; devices override."""

    def config_changed(self) -> None:
        """The device changed its configuration: bump the generation and
        raise a configuration interrupt once the driver is up."""
        with self.lock:
            self.config_generation = (self.config_generation + 1) & 0xFF
            if self.status & V.STATUS_DRIVER_OK and self.transport is not None:
                self.transport.signal_config()

    # -- queue service ----------------------------------------------------------------

    def notify(self, index: int) -> None:
        """The driver notified queue ``index`` (any thread; cheap)."""
        if not 0 <= index < len(self.queues) or self.closed:
            return
        if self.threaded:
            os.eventfd_write(self._notify_fds[index], 1)
        else:
            with self.lock:
                self.serve(index)

    def _queue_kicked(self, index: int, fd: int) -> Callable[[int], None]:
        def kicked(_mask: int) -> None:
            drain_eventfd(fd)
            self.serve(index)
        return kicked

    def serve(self, index: int) -> None:
        """Run ``process_queue(index)`` if the device is live, turning any
        failure into a failed request or NEEDS_RESET, never an exception."""
        with self.lock:
            if not self.active or not self.queues[index].ready:
                return
            try:
                self.process_queue(index)
            except QueueBroken as exc:
                self.needs_reset(str(exc))
            except Exception as exc:
                self.internal_errors += 1
                log.exception("%s: queue %d failed", self.name, index)
                self.needs_reset(f"queue {index}: {type(exc).__name__}: {exc}")

    def process_queue(self, index: int) -> None:
        """Serve queue ``index`` (override); called with the lock held."""

    def chains(self, index: int) -> Iterator[Chain]:
        """Pop chains until the queue is empty; malformed ones are returned
        to the driver with length 0 and counted, not handed out."""
        q = self.queues[index]
        while self.active:
            try:
                chain = q.pop()
            except ChainError as exc:
                q.errors += 1
                log.debug("%s: %s", self.name, exc)
                if exc.head is not None:
                    q.push(exc.head, 0)
                continue
            if chain is None:
                return
            yield chain

    def drain(self, index: int, handle: Callable[[Chain], int]) -> None:
        """Serve every available chain with ``handle`` (returns bytes
        written), re-arming notifications race-free, then interrupt once."""
        q = self.queues[index]
        while self.active:
            q.disable_notification()
            for chain in self.chains(index):
                try:
                    written = handle(chain)
                except ChainError as exc:
                    q.errors += 1
                    log.debug("%s: %s", self.name, exc)
                    written = 0
                q.push(chain.head, written)
            if not q.enable_notification():
                break
        self.signal_used(index)

    def signal_used(self, index: int) -> None:
        if self.queues[index].needs_interrupt() and self.transport is not None:
            self.transport.signal_queue(index)

    # -- hooks --------------------------------------------------------------------------

    def on_activate(self) -> None:
        """The driver is up (DRIVER_OK): start host-side work."""

    def on_reset(self) -> None:
        """The device was reset: drop host-side state."""

    # -- snapshots -------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Everything needed to resume the device in a restored VM (the
        host side of devices like vsock and net is not part of it)."""
        with self.lock:
            return {"status": self.status, "driver_features": self.driver_features,
                    "config_generation": self.config_generation, "active": self.active,
                    "queues": [q.state() for q in self.queues],
                    "config": bytes(self.config).hex()}

    def restore(self, state: dict[str, Any]) -> None:
        with self.lock:
            self.reset()
            self.driver_features = int(state["driver_features"])
            self.config_generation = int(state["config_generation"])
            self.config[:] = bytes.fromhex(state["config"])
            for q, qs in zip(self.queues, state["queues"]):
                q.restore(qs)
            self.status = int(state["status"])
            if state["active"]:
                self._activate()

    # -- teardown -----------------------------------------------------------------------

    def close(self) -> None:
        """Stop the worker and free host resources (idempotent)."""
        if self.closed:
            return
        with self.lock:
            self.active = False
            self.closed = True
        self.worker.close()
        with self.lock:
            for q in self.queues:
                q.release()
            try:
                self.on_close()
            except Exception:
                log.exception("%s: close hook failed", self.name)
            for fd in self._notify_fds:
                os.close(fd)
            self._notify_fds = []

    def pause(self) -> None:
        """Stop serving (queues and host-side I/O) until ``resume()``, so
        guest memory and the device's state hold still: for snapshots of a
        paused VM. What arrives meanwhile waits in its fd."""
        self.worker.hold()

    def resume(self) -> None:
        self.worker.release()

    def on_close(self) -> None:
        """Free host resources (override)."""

    def __enter__(self) -> "VirtioDevice":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
