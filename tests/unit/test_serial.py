from hvkit.devices.irq import RecordingLine
from hvkit.devices import serial as s
from hvkit.devices.serial import Serial16550


class Sink:
    def __init__(self):
        self.data = bytearray()

    def write(self, b):
        self.data += b


def make():
    sink, irq = Sink(), RecordingLine()
    return Serial16550(sink, irq), sink, irq


def rd(u, off):
    return u.read(off, 1)[0]


def wr(u, off, v):
    u.write(off, bytes([v]))


def test_transmit_goes_to_sink_and_lsr_reports_empty():
    u, sink, _ = make()
    for ch in b"hi":
        wr(u, s.RBR_THR, ch)
    assert sink.data == b"hi"
    assert rd(u, s.LSR) & (s.LSR_THRE | s.LSR_TEMT) == s.LSR_THRE | s.LSR_TEMT


def test_dlab_switches_offsets_to_divisor():
    u, sink, _ = make()
    wr(u, s.LCR, 0x80 | 0x03)
    wr(u, 0, 0x01)
    wr(u, 1, 0x00)
    assert (rd(u, 0), rd(u, 1)) == (1, 0)
    assert sink.data == b""               # divisor writes are not output
    wr(u, s.LCR, 0x03)
    wr(u, 0, ord("A"))
    assert sink.data == b"A"
    assert rd(u, s.IER) == 0


def test_receive_sets_dr_and_raises_rdi_interrupt():
    u, _, irq = make()
    wr(u, s.IER, s.IER_RDI)
    assert rd(u, s.IIR_FCR) & 0x0F == s.IIR_NONE
    u.feed(b"ok")
    assert irq.level is True
    assert rd(u, s.LSR) & s.LSR_DR
    assert rd(u, s.IIR_FCR) & 0x0F == s.IIR_RDI
    assert rd(u, s.RBR_THR) == ord("o")
    assert rd(u, s.RBR_THR) == ord("k")
    assert not rd(u, s.LSR) & s.LSR_DR
    assert irq.level is False


def test_thre_interrupt_on_enable_and_cleared_by_iir_read():
    u, _, irq = make()
    wr(u, s.IER, s.IER_THRI)
    assert irq.level is True              # THR is empty: interrupt at once
    assert rd(u, s.IIR_FCR) & 0x0F == s.IIR_THRI
    assert irq.level is False             # reading IIR acknowledged it
    wr(u, s.RBR_THR, ord("x"))
    assert irq.level is True              # transmitted: empty again


def test_iir_priority_receive_before_thre():
    u, _, _ = make()
    wr(u, s.IER, s.IER_THRI | s.IER_RDI)
    u.feed(b"z")
    assert rd(u, s.IIR_FCR) & 0x0F == s.IIR_RDI


def test_fifo_bits_in_iir_and_clear():
    u, _, _ = make()
    wr(u, s.IIR_FCR, s.FCR_ENABLE)
    assert rd(u, s.IIR_FCR) & 0xC0 == 0xC0
    u.feed(b"abc")
    wr(u, s.IIR_FCR, s.FCR_ENABLE | s.FCR_CLEAR_RX)
    assert not rd(u, s.LSR) & s.LSR_DR


def test_loopback_probe_as_linux_8250_does():
    u, sink, _ = make()
    wr(u, s.MCR, s.MCR_LOOP | 0x0A)       # LOOP | OUT2 | RTS
    assert rd(u, s.MSR) & 0xF0 == 0x90    # DCD | CTS mirror OUT2 | RTS
    wr(u, s.RBR_THR, 0x55)
    assert sink.data == b""               # loopback does not leave the UART
    assert rd(u, s.RBR_THR) == 0x55
    wr(u, s.MCR, s.MCR_OUT2)
    assert rd(u, s.MSR) & 0xB0 == 0xB0


def test_scratch_register():
    u, _, _ = make()
    wr(u, s.SCR, 0xA5)
    assert rd(u, s.SCR) == 0xA5


def test_feed_without_waiting_takes_what_fits_and_drops_nothing():
    u, _, _ = make()
    assert u.feed(b"x" * (s.RX_LIMIT + 10), timeout=0) == s.RX_LIMIT
    assert u.feed(b"y", timeout=0) == 0
    assert u.overruns == 0 and not rd(u, s.LSR) & s.LSR_OE
    assert rd(u, s.RBR_THR) == ord("x")
    assert u.feed(b"y", timeout=0) == 1


def test_feed_timeout_returns_what_was_queued():
    import time
    u, _, _ = make()
    t0 = time.monotonic()
    assert u.feed(b"z" * (s.RX_LIMIT + 5), timeout=0.2) == s.RX_LIMIT
    assert 0.15 < time.monotonic() - t0 < 5


def guest_reader(u, n, out):
    """Read n bytes as a polling driver does: LSR.DR, then RBR."""
    while len(out) < n:
        if rd(u, s.LSR) & s.LSR_DR:
            out.append(rd(u, s.RBR_THR))


def test_input_larger_than_the_queue_arrives_whole_and_in_order():
    import threading
    u, _, _ = make()
    data = bytes(range(256)) * 1024          # 4 x the queue, ending in 0xff
    out = bytearray()
    t = threading.Thread(target=guest_reader, args=(u, len(data), out), daemon=True)
    t.start()
    assert u.feed(data) == len(data)
    t.join(60)
    assert bytes(out) == data


def test_close_wakes_a_feed_waiting_for_room():
    import threading
    u, _, _ = make()
    got = []
    t = threading.Thread(target=lambda: got.append(u.feed(b"q" * (s.RX_LIMIT + 100))),
                         daemon=True)
    t.start()
    t.join(0.2)
    assert t.is_alive()                   # waiting: the guest has not read
    u.close()
    t.join(5)
    assert got == [s.RX_LIMIT]
    assert u.feed(b"late") == 0


def test_loopback_overrun_sets_oe():
    u, _, _ = make()
    wr(u, s.MCR, s.MCR_LOOP)
    u.feed(b"x" * s.RX_LIMIT, timeout=0)
    wr(u, s.RBR_THR, 0x55)
    assert u.overruns == 1
    assert rd(u, s.LSR) & s.LSR_OE
    assert not rd(u, s.LSR) & s.LSR_OE    # OE clears when read


def test_wide_accesses_have_no_side_effects():
    u, sink, _ = make()
    u.feed(b"ab")
    assert u.read(s.RBR_THR, 2) == b"\xff\xff"
    assert u.read(s.RBR_THR, 4) == b"\xff" * 4
    u.write(s.RBR_THR, b"xy")
    u.write(s.LCR, b"\x80\x00")
    assert sink.data == b"" and u.lcr == 0x03
    assert u.wide_accesses == 4
    assert rd(u, s.RBR_THR) == ord("a")    # nothing was popped
    assert rd(u, s.RBR_THR) == ord("b")


def test_transmit_to_an_undrained_console_is_dropped_and_counted():
    import os
    from hvkit import _native
    rfd, wfd = os.pipe()
    try:
        sink = _native.ConsoleSink()
        sink.fd = wfd
        u = Serial16550(sink)
        for _ in range(70 * 1024):
            wr(u, s.RBR_THR, ord("o"))
        assert len(sink.getvalue()) == 70 * 1024
        assert u.tx_dropped >= 70 * 1024 - 65536
    finally:
        os.close(rfd)
        os.close(wfd)


def test_fast_path_state_follows_the_model():
    from hvkit import _native
    from hvkit.devices.serial import Serial16550
    sink = _native.ConsoleSink()
    u = Serial16550(sink)
    nvm = _native.NativeVm()
    assert u.attach_native(nvm, 0x3F8)
    wr(u, s.LCR, 0x83)
    assert u.fast.dlab == 1
    wr(u, s.LCR, 0x03)
    wr(u, s.IER, s.IER_THRI)
    assert (u.fast.dlab, u.fast.thri) == (0, 1)
    u.feed(b"q")
    assert u.fast.rx_ready == 1
    rd(u, s.RBR_THR)
    assert u.fast.rx_ready == 0
    wr(u, s.RBR_THR, ord("Z"))            # slow path writes reach the same sink
    assert sink.getvalue() == b"Z"


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["r", "w", "feed"]), st.integers(0, 7),
                          st.sampled_from([1, 1, 1, 2, 4]), st.integers(0, 255)),
                max_size=60))
def test_any_guest_access_sequence_keeps_the_model_sane(ops):
    u, sink, irq = make()
    fed = 0
    for op, off, size, val in ops:
        if op == "feed":
            fed += u.feed(bytes([val]) * 3, timeout=0)
        elif op == "r":
            assert len(u.read(off, size)) == size
        else:
            u.write(off, bytes([val]) * size)
        assert len(u.rx) <= s.RX_LIMIT
        assert bool(rd(u, s.LSR) & s.LSR_DR) == bool(u.rx)
    assert fed % 3 == 0
