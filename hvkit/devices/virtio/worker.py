"""The thread a virtio device serves its queues on, off the vCPU thread.

A notification only writes to the queue's eventfd; the worker wakes on it
(the same eventfd can be registered with KVM as an ioeventfd, so the guest
reaches the worker without any exit to user space). Devices with host-side
fds (a tap, sockets) register those too. Callbacks run under the device
lock, one at a time. ``hold()``/``release()`` stop and restart them, so a
paused VM's memory holds still while a snapshot is taken.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import os
import selectors
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)

Callback = Callable[[int], None]


def new_eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def drain_eventfd(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


class Worker:
    """A selector loop on its own thread.

    ``register``/``modify``/``unregister`` may be called from any thread
    holding ``lock``; every callback runs with ``lock`` held.
    """

    def __init__(self, name: str, lock: threading.RLock) -> None:
        self.name = name
        self.lock = lock
        self._sel = selectors.DefaultSelector()
        self._stop_fd = new_eventfd()
        self._sel.register(self._stop_fd, selectors.EVENT_READ, None)
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._wake_fd = new_eventfd()
        self._sel.register(self._wake_fd, selectors.EVENT_READ, None)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._running_gate = threading.Event()
        self._running_gate.set()
        #: callbacks that raised (logged; the loop goes on)
        self.callback_errors = 0
        #: the exception that ended the loop, if one did
        self.error: BaseException | None = None

    def register(self, fd: int, events: int, callback: Callback) -> None:
        self._sel.register(fd, events, callback)

    def modify(self, fd: int, events: int, callback: Callback) -> None:
        self._sel.modify(fd, events, callback)

    def unregister(self, fd: int) -> None:
        try:
            self._sel.unregister(fd)
        except (KeyError, ValueError):
            pass

    def registered(self, fd: int) -> bool:
        return fd in self._sel.get_map()

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the worker (lock held) after ``delay`` seconds;
        callers hold the lock too."""
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), fn))
        self._wake()

    def _wake(self) -> None:
        """Make the loop recompute its timeout."""
        if self._wake_fd >= 0:
            os.eventfd_write(self._wake_fd, 1)

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, fn = heapq.heappop(self._timers)
            try:
                fn()
            except Exception:
                self.callback_errors += 1
                log.exception("%s: timer failed", self.name)

    def _timeout(self) -> float | None:
        if not self._timers:
            return None
        return max(0.0, self._timers[0][0] - time.monotonic())

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sel = self._sel
        try:
            while not self._stopping:
                events = sel.select(self._timeout())
                self._running_gate.wait()
                if self._stopping:
                    break
                with self.lock:
                    self._run_timers()
                    for key, mask in events:
                        if key.data is None:
                            if key.fd == self._wake_fd:
                                drain_eventfd(self._wake_fd)
                            continue
                        # the fd may have been unregistered by an earlier callback
                        if sel.get_map().get(key.fd) is not key:
                            continue
                        try:
                            key.data(mask)
                        except Exception:
                            self.callback_errors += 1
                            log.exception("%s: callback for fd %d failed", self.name, key.fd)
        except BaseException as exc:     # keep the reason for whoever asks
            self.error = exc
            log.exception("%s: worker stopped", self.name)

    def hold(self) -> None:
        """Stop running callbacks until ``release()``: the callback running
        now finishes first (it holds the lock), nothing new starts. Events
        wait in their fds. Not from a callback."""
        self._running_gate.clear()
        with self.lock:
            pass

    def release(self) -> None:
        self._running_gate.set()

    @property
    def held(self) -> bool:
        return not self._running_gate.is_set()

    def stop(self) -> None:
        """End the loop and join the thread (not from a callback)."""
        self._stopping = True
        self._running_gate.set()
        os.eventfd_write(self._stop_fd, 1)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def close(self) -> None:
        self.stop()
        self._sel.close()
        for fd in (self._stop_fd, self._wake_fd):
            if fd >= 0:
                os.close(fd)
        self._stop_fd = self._wake_fd = -1
