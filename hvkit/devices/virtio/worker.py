"""The thread a virtio device serves its queues on, off the vCPU thread.

A notification only writes to the queue's eventfd; the worker wakes on it
(the same eventfd can be registered with KVM as an ioeventfd, so the guest
reaches the worker without any exit to user space). Devices with host-side
fds (a tap, sockets) register those too. Callbacks run under the device
lock, one at a time.
"""
from __future__ import annotations

import logging
import os
import selectors
import threading
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
        self._thread: threading.Thread | None = None
        self._stopping = False
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
                events = sel.select()
                with self.lock:
                    for key, mask in events:
                        if key.data is None:
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

    def stop(self) -> None:
        """End the loop and join the thread (not from a callback)."""
        self._stopping = True
        os.eventfd_write(self._stop_fd, 1)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def close(self) -> None:
        self.stop()
        self._sel.close()
        if self._stop_fd >= 0:
            os.close(self._stop_fd)
            self._stop_fd = -1
