"""Closing KVM objects off the caller's path.

Destroying a VM with the in-kernel irqchip costs the kernel 10-25 ms of
waiting (not CPU) on this kind of host; a launcher that starts many VMs
need not wait for it.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Iterable

_lock = threading.Lock()
_queue: "queue.Queue[list[Any]] | None" = None


def _loop(q: "queue.Queue[list[Any]]") -> None:
    while True:
        items = q.get()
        for item in items:
            try:
                item.close()
            except Exception:
                pass
        q.task_done()


def reap(items: Iterable[Any], wait: bool = True) -> None:
    """Close each item, now or (``wait=False``) on the reaper thread."""
    global _queue
    items = list(items)
    if wait:
        for item in items:
            item.close()
        return
    with _lock:
        if _queue is None:
            _queue = queue.Queue()
            threading.Thread(target=_loop, args=(_queue,), name="hvkit-reaper",
                             daemon=True).start()
    _queue.put(items)


def wait_for_closes() -> None:
    """Block until every VM closed with ``close(wait=False)`` is gone."""
    if _queue is not None:
        _queue.join()
