"""virtio-console (virtio 1.2, 5.3) with one port: a console with no exit
per byte.

The guest's output arrives in whole buffers on the transmit queue and goes
to ``sink`` (a callable taking bytes; by default it collects in
``output``). Input from the host (``send_input``, or a ``feed_fd`` such as
a terminal) waits in a bounded buffer until the guest offers receive
buffers. VIRTIO_CONSOLE_F_EMERG_WRITE lets a guest print before its driver
has set up the queues.
"""
from __future__ import annotations

import os
import selectors
import struct
import threading
from typing import Callable

from hvkit.devices.virtio import spec as V
from hvkit.devices.virtio.chain import Chain
from hvkit.devices.virtio.device import VirtioDevice
from hvkit.devices.virtio.worker import drain_eventfd, new_eventfd
from hvkit.memory.guest import GuestMemory

RX = 0
TX = 1
QUEUE_SIZE = 128
F_SIZE = 0
F_EMERG_WRITE = 2
EMERG_WR = 8
_CONFIG = struct.Struct("<HHII")


class VirtioConsole(VirtioDevice):
    device_id = V.ID_CONSOLE
    pci_class = 0x078000

    def __init__(self, mem: GuestMemory, *, sink: Callable[[bytes], None] | None = None,
                 feed_fd: int | None = None, cols: int = 80, rows: int = 25,
                 max_input: int = 1 << 20, max_output: int = 16 << 20,
                 threaded: bool = True) -> None:
        super().__init__(mem, [QUEUE_SIZE, QUEUE_SIZE], features=1 << F_EMERG_WRITE,
                         threaded=threaded, name="console")
        self.config = bytearray(_CONFIG.pack(cols, rows, 1, 0))
        #: everything the guest wrote, when no sink is given (bounded by max_output)
        self.output = bytearray()
        self.max_output = max_output
        self.sink = sink if sink is not None else self._collect
        self.max_input = max_input
        self._input = bytearray()
        self._input_lock = threading.Lock()
        self._input_fd = new_eventfd()
        self.worker.register(self._input_fd, selectors.EVENT_READ, self._input_kicked)
        self.feed_fd = feed_fd
        self._feed_eof = False
        if feed_fd is not None:
            os.set_blocking(feed_fd, False)
            self.worker.register(feed_fd, selectors.EVENT_READ, self._feed_readable)
        self._output_event = threading.Condition()

    # -- host side -------------------------------------------------------------

    def _collect(self, data: bytes) -> None:
        with self._output_event:
            self.output += data
            if len(self.output) > self.max_output:
                del self.output[:len(self.output) - self.max_output]
            self._output_event.notify_all()

    def wait_output(self, needle: bytes, timeout: float) -> bool:
        """Wait until ``needle`` appears in ``output`` (default sink only)."""
        with self._output_event:
            return self._output_event.wait_for(lambda: needle in self.output, timeout)

    def send_input(self, data: bytes) -> int:
        """Queue input for the guest; returns how many bytes were accepted
        (the rest does not fit in ``max_input``)."""
        with self._input_lock:
            n = min(len(data), self.max_input - len(self._input))
            self._input += data[:n]
        if n:
            if self.threaded:
                os.eventfd_write(self._input_fd, 1)
            else:
                self.serve(RX)
        return n

    def _input_kicked(self, _mask: int) -> None:
        drain_eventfd(self._input_fd)
        self.serve(RX)

    def _feed_readable(self, _mask: int) -> None:
        with self._input_lock:
            room = self.max_input - len(self._input)
        if room <= 0:
            # stop reading until the guest drains its input
            self.worker.unregister(self.feed_fd)
            return
        try:
            data = os.read(self.feed_fd, min(room, 65536))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._feed_eof = True
            self.worker.unregister(self.feed_fd)
            return
        with self._input_lock:
            self._input += data
        self.serve(RX)

    # -- guest side ----------------------------------------------------------------

    def write_config(self, offset: int, data: bytes) -> None:
        if offset == EMERG_WR and data and self.negotiated(F_EMERG_WRITE):
            self.sink(bytes(data[:1]))

    def process_queue(self, index: int) -> None:
        if index == TX:
            self.drain(TX, self._transmit)
        else:
            self._receive()

    def _transmit(self, chain: Chain) -> int:
        r = chain.reader()
        data = r.read(r.remaining)
        if data:
            self.sink(data)
        return 0

    def _receive(self) -> None:
        q = self.queues[RX]
        with self._input_lock:
            pending = bool(self._input)
        while pending and self.active:
            got = False
            for chain in self.chains(RX):
                got = True
                w = chain.writer()
                with self._input_lock:
                    n = min(w.remaining, len(self._input))
                    w.write(self._input[:n])
                    del self._input[:n]
                    pending = bool(self._input)
                q.push(chain.head, n)
                if not pending:
                    break
            if not got and not q.enable_notification():
                break
        self.signal_used(RX)
        if self.feed_fd is not None and not self._feed_eof \
                and not self.worker.registered(self.feed_fd) \
                and len(self._input) < self.max_input:
            self.worker.register(self.feed_fd, selectors.EVENT_READ, self._feed_readable)

    def on_reset(self) -> None:
        with self._input_lock:
            self._input.clear()

    def on_close(self) -> None:
        if self._input_fd >= 0:
            os.close(self._input_fd)
            self._input_fd = -1
