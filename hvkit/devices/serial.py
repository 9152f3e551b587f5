"""A 16550A UART (COM1), with the register semantics Linux's 8250 driver
relies on: DLAB, FIFO control, IIR priorities, loopback for the probe, and
THRE/receive interrupts.

The transmit path and LSR reads can be served in C (``attach_native``);
this model then keeps the C side's view of DLAB, IER and input current.

The registers are one byte wide: an access of any other size has no effect
(reads return all ones, writes are ignored; both are counted in
``wide_accesses``), so a 2- or 4-byte read of RBR never pops input.
Host input is never dropped: ``feed`` waits for the guest to make room.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Protocol

from hvkit.devices.irq import IrqLine

RBR_THR = 0
IER = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDI = 0x01
IER_THRI = 0x02
IER_RLSI = 0x04
IER_MSI = 0x08

IIR_NONE = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_FIFO = 0xC0

LCR_DLAB = 0x80
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10

LSR_DR = 0x01
LSR_OE = 0x02
LSR_THRE = 0x20
LSR_TEMT = 0x40

MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80

FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02

RX_LIMIT = 64 * 1024
# A feed waiting for room is woken once this much of the queue is free, so
# a large input refills in big steps rather than a byte per guest read.
RX_REFILL = RX_LIMIT // 2


class Sink(Protocol):
    def write(self, data: bytes) -> object: ...


class Serial16550:
    """COM port model. ``sink`` receives transmitted bytes; ``feed()`` is
    host input; ``irq`` is the interrupt line (IRQ 4 for COM1)."""

    def __init__(self, sink: Sink, irq: IrqLine | None = None) -> None:
        self.sink = sink
        self.irq = irq
        self.lock = threading.Lock()
        self._room = threading.Condition(self.lock)
        self._feeders = 0
        self.closed = False
        self.fast = None
        self.ier = 0
        self.lcr = 0x03
        self.mcr = MCR_OUT2
        self.lsr = LSR_THRE | LSR_TEMT
        self.scr = 0
        self.dll = 0x0C
        self.dlm = 0
        self.fcr = 0
        self.msr_delta = 0
        self.thr_ipending = False
        self.rx: collections.deque[int] = collections.deque()
        self.overruns = 0
        self.wide_accesses = 0

    def attach_native(self, native_vm, base: int) -> bool:
        """Let C serve THR writes and LSR reads for this UART."""
        from hvkit import _native
        if not isinstance(self.sink, _native.ConsoleSink):
            return False
        self.fast = _native.SerialFastPath(self.sink)
        native_vm.add_serial(base, self.fast)
        self._sync()
        return True

    @property
    def tx_dropped(self) -> int:
        """Output bytes the live console could not take in time (a pipe
        nobody reads): dropped rather than stalling the guest. The sink's
        in-memory copy still has them."""
        return int(getattr(self.sink, "fd_dropped", 0))

    # -- host side -----------------------------------------------------------
    def feed(self, data: bytes, timeout: float | None = None) -> int:
        """Queue host input for the guest; returns how many bytes were queued.

        The receive queue holds ``RX_LIMIT`` (64 KiB) bytes. Input beyond
        that is not dropped: ``feed`` waits until the guest reads and makes
        room (back-pressure). ``timeout=None`` waits until all of ``data``
        is queued; a number waits at most that many seconds and ``0`` never
        waits (it queues what fits now). The return value is then less than
        ``len(data)``; the caller sends the rest later. ``close()`` makes a
        waiting feed return at once, and a closed UART queues nothing (0).
        Call it from a host thread, never from a vCPU thread with a timeout
        of None: that vCPU could not run the guest that makes room.
        """
        view = memoryview(data).cast("B")
        total, done = len(view), 0
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        with self._room:
            while not self.closed:
                room = RX_LIMIT - len(self.rx)
                if room > 0 and done < total:
                    take = min(room, total - done)
                    self.rx.extend(view[done:done + take])
                    done += take
                    self._update()
                if done == total:
                    break
                wait = None
                if deadline is not None:
                    wait = deadline - time.monotonic()
                    if wait <= 0:
                        break
                self._feeders += 1
                try:
                    self._room.wait(wait)
                finally:
                    self._feeders -= 1
        return done

    def close(self) -> None:
        """Refuse further input and wake every feed waiting for room (the VM
        is going away: nobody will read it)."""
        with self._room:
            self.closed = True
            self._room.notify_all()

    def state(self) -> dict:
        """Registers and pending input, for a snapshot (the C transmit path
        keeps no state of its own beyond what _sync mirrors)."""
        with self.lock:
            return {"ier": self.ier, "lcr": self.lcr, "mcr": self.mcr, "lsr": self.lsr,
                    "scr": self.scr, "dll": self.dll, "dlm": self.dlm, "fcr": self.fcr,
                    "msr_delta": self.msr_delta, "thr_ipending": self.thr_ipending,
                    "rx": bytes(self.rx).hex()}

    def restore(self, state: dict) -> None:
        with self.lock:
            for name in ("ier", "lcr", "mcr", "lsr", "scr", "dll", "dlm", "fcr", "msr_delta"):
                setattr(self, name, int(state[name]) & 0xFF)
            self.thr_ipending = bool(state["thr_ipending"])
            self.rx = collections.deque(bytes.fromhex(state["rx"]))
            self._update()

    # -- guest side ----------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        if size != 1:
            self.wide_accesses += 1
            return b"\xff" * size
        with self.lock:
            return bytes([self._read(offset)])

    def write(self, offset: int, data: bytes) -> None:
        if len(data) != 1:
            self.wide_accesses += 1
            return
        with self.lock:
            self._write(offset, data[0])

    def _drained(self) -> None:
        """The guest took input (or cleared the FIFO): wake a waiting feed
        once there is room for a good refill."""
        if self._feeders and RX_LIMIT - len(self.rx) >= RX_REFILL:
            self._room.notify_all()

    def _read(self, off: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if off == RBR_THR:
            if dlab:
                return self.dll
            value = self.rx.popleft() if self.rx else 0
            self._drained()
            self._update()
            return value
        if off == IER:
            return self.dlm if dlab else self.ier
        if off == IIR_FCR:
            iir = self._iir()
            if iir == IIR_THRI:
                self.thr_ipending = False
                self._update()
            return iir | (IIR_FIFO if self.fcr & FCR_ENABLE else 0)
        if off == LCR:
            return self.lcr
        if off == MCR:
            return self.mcr
        if off == LSR:
            value = self.lsr | (LSR_DR if self.rx else 0)
            self.lsr &= ~LSR_OE
            self._update()
            return value
        if off == MSR:
            if self.mcr & MCR_LOOP:
                m = self.mcr
                value = ((MSR_CTS if m & MCR_RTS else 0) | (MSR_DSR if m & MCR_DTR else 0)
                         | (MSR_RI if m & MCR_OUT1 else 0) | (MSR_DCD if m & MCR_OUT2 else 0))
            else:
                value = MSR_DCD | MSR_DSR | MSR_CTS
            value |= self.msr_delta
            self.msr_delta = 0
            self._update()
            return value
        return self.scr

    def _write(self, off: int, value: int) -> None:
        dlab = self.lcr & LCR_DLAB
        if off == RBR_THR:
            if dlab:
                self.dll = value
                return
            if self.mcr & MCR_LOOP:
                if len(self.rx) < RX_LIMIT:
                    self.rx.append(value)
                else:  # the receiver overruns, as a 16550's does
                    self.overruns += 1
                    self.lsr |= LSR_OE
            else:
                self.sink.write(bytes([value]))
            # Transmission is instant: THR is empty again at once.
            self.thr_ipending = True
            self._update()
        elif off == IER:
            if dlab:
                self.dlm = value
                return
            old = self.ier
            self.ier = value & 0x0F
            if self.ier & IER_THRI and not old & IER_THRI:
                self.thr_ipending = True
            self._update()
        elif off == IIR_FCR:
            self.fcr = value & 0xC9
            if value & FCR_CLEAR_RX:
                self.rx.clear()
                self._drained()
            self._update()
        elif off == LCR:
            self.lcr = value
            self._sync()
        elif off == MCR:
            self.mcr = value & 0x1F
            self._update()
        elif off == SCR:
            self.scr = value

    def _iir(self) -> int:
        if self.ier & IER_RLSI and self.lsr & LSR_OE:
            return IIR_RLSI
        if self.ier & IER_RDI and self.rx:
            return IIR_RDI
        if self.ier & IER_THRI and self.thr_ipending:
            return IIR_THRI
        if self.ier & IER_MSI and self.msr_delta:
            return IIR_MSI
        return IIR_NONE

    def _update(self) -> None:
        self._sync()
        if self.irq is not None:
            self.irq.set_level(self._iir() != IIR_NONE)

    def _sync(self) -> None:
        f = self.fast
        if f is not None:
            f.dlab = 1 if self.lcr & LCR_DLAB else 0
            f.thri = 1 if self.ier & IER_THRI else 0
            f.loopback = 1 if self.mcr & MCR_LOOP else 0
            f.rx_ready = 1 if self.rx else 0
