"""virtio-rng (virtio 1.2, 5.4): entropy from the host's getrandom(2).

One request queue; every writable buffer the driver offers is filled.
A request is capped (``max_request``) so that one huge buffer cannot keep
the worker busy or make the host draw megabytes of entropy at once.
"""
from __future__ import annotations

import os

from hvkit.devices.virtio import spec as V
from hvkit.devices.virtio.chain import Chain
from hvkit.devices.virtio.device import VirtioDevice
from hvkit.memory.guest import GuestMemory

QUEUE_SIZE = 256


class VirtioRng(VirtioDevice):
    device_id = V.ID_RNG
    pci_class = 0xFF0000

    def __init__(self, mem: GuestMemory, *, max_request: int = 64 << 10,
                 threaded: bool = True) -> None:
        super().__init__(mem, [QUEUE_SIZE], threaded=threaded, name="rng")
        self.max_request = max_request

    def process_queue(self, index: int) -> None:
        self.drain(index, self._fill)

    def _fill(self, chain: Chain) -> int:
        w = chain.writer()
        want = min(w.remaining, self.max_request)
        for view in w.take(want):
            pos = 0
            while pos < len(view):
                # getrandom returns at most 32 MiB - 1 per call, and may be short
                pos += _fill_view(view[pos:])
        return w.done


def _fill_view(view: memoryview) -> int:
    data = os.getrandom(len(view))
    view[:len(data)] = data
    return len(data)
