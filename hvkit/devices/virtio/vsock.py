"""virtio-vsock (virtio 1.2, 5.10) with Firecracker's host-side model.

The guest's stream connections to the host (CID 2) port P are connected to
the UNIX socket ``<uds_path>_P``. A host process reaches the guest by
connecting to ``<uds_path>`` and writing ``CONNECT P\\n``; once the guest
accepts, it reads ``OK <host port>\\n`` and the socket carries the stream.
Firecracker users find the same paths and the same handshake. A host
socket that only shuts down its sending side (``shutdown(SHUT_WR)``, as in
send a request, then read the answer) reaches the guest as a SHUTDOWN with
the SEND flag alone, so the guest can still answer; a closed one as both.

Flow control is the spec's credit scheme in both directions: the device
never sends a connection more than the guest's advertised ``buf_alloc``
minus what is in flight, and a guest that sends more than our
``buf_alloc`` gets its connection reset. All socket I/O runs on the
device's worker thread; guest data goes to a socket straight from guest
memory, and socket data is received straight into the guest's buffers.

Each pass over the transmit queue gathers a connection's data packets and
hands them to its socket in one ``sendmsg``; on receive, a read that fills
its buffer is followed by one ``recvmsg_into`` into up to 15 more: a stream
costs a system call (and a wake-up of the process on the other end) per
batch, not per packet, while a short message still costs one read. The
guest's buffers go back to it only after their bytes are in the socket or
copied.
"""
from __future__ import annotations

import errno
import logging
import os
import select
import selectors
import socket
import stat
import struct
from collections import deque

from hvkit.devices.virtio import spec as V
from hvkit.devices.virtio.chain import Chain, ChainError
from hvkit.devices.virtio.device import VirtioDevice
from hvkit.errors import ConfigError
from hvkit.memory.guest import GuestMemory

log = logging.getLogger(__name__)

RX = 0
TX = 1
EVENT = 2
QUEUE_SIZE = 256
EVENT_QUEUE_SIZE = 16

HOST_CID = 2
TYPE_STREAM = 1
OP_REQUEST = 1
OP_RESPONSE = 2
OP_RST = 3
OP_SHUTDOWN = 4
OP_RW = 5
OP_CREDIT_UPDATE = 6
OP_CREDIT_REQUEST = 7
SHUTDOWN_RCV = 1
SHUTDOWN_SEND = 2
EVENT_TRANSPORT_RESET = 0

HDR = struct.Struct("<QQIIIHHIII")
#: Linux never sends a bigger payload in one packet
MAX_PKT = 64 << 10
#: guest buffers gathered into one sendmsg (IOV_MAX is 1024)
MAX_BATCH_VIEWS = 512
#: receive buffers one recvmsg_into fills at most
MAX_RX_BATCH = 16
MAX_LINE = 32
FIRST_LOCAL_PORT = 1 << 30

# connection states
AWAIT_LINE = "await-connect-line"     # host client connected, no CONNECT yet
LOCAL_INIT = "local-init"             # we sent REQUEST to the guest
ESTABLISHED = "established"
CLOSING = "closing"                   # we sent SHUTDOWN, waiting for the guest's RST


class Connection:
    """One stream between a guest port and a host UNIX socket."""

    def __init__(self, sock: socket.socket, local_port: int, peer_port: int,
                 state: str) -> None:
        self.sock = sock
        self.local_port = local_port
        self.peer_port = peer_port
        self.state = state
        self.tx_buf = bytearray()          # guest -> host bytes the socket did not take yet
        self.batch: list[memoryview] = []  # guest data of this pass, not yet sent
        self.batch_len = 0
        self.fwd_cnt = 0                   # guest bytes we delivered to the socket
        self.fwd_cnt_sent = 0              # fwd_cnt the guest last heard
        self.rx_cnt = 0                    # bytes we sent the guest
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.ctrl: deque[tuple[int, int]] = deque()   # (op, flags) to send
        self.readable = False              # socket has data we have not read
        self.eof = False                   # the host shut down its sending side
        self.close_flushed = False         # reset once tx_buf is sent
        self.peer_shut = 0                 # SHUTDOWN flags from the guest
        self.events = 0                    # what the worker watches

    @property
    def key(self) -> tuple[int, int]:
        return (self.local_port, self.peer_port)

    def peer_credit(self) -> int:
        return max(0, self.peer_buf_alloc - ((self.rx_cnt - self.peer_fwd_cnt) & 0xFFFFFFFF))

    def __repr__(self) -> str:
        return f"<vsock {self.local_port}<->{self.peer_port} {self.state}>"


class VirtioVsock(VirtioDevice):
    device_id = V.ID_VSOCK
    pci_class = 0x078000

    def __init__(self, mem: GuestMemory, guest_cid: int, uds_path: str | os.PathLike[str], *,
                 buf_alloc: int = 256 << 10, max_connections: int = 1024,
                 timeout: float = 2.0, threaded: bool = True) -> None:
        if not 3 <= guest_cid < 0xFFFFFFFF:
            raise ConfigError(f"vsock: guest CID {guest_cid} must be 3..0xfffffffe")
        self.uds_path = os.fspath(uds_path)
        self.guest_cid = guest_cid
        self.buf_alloc = buf_alloc
        self.max_connections = max_connections
        #: how long the guest may take to answer a REQUEST, or to reset a
        #: connection the host closed, before the device resets it
        self.timeout = timeout
        self.listener = _listen(self.uds_path)
        super().__init__(mem, [QUEUE_SIZE, QUEUE_SIZE, EVENT_QUEUE_SIZE],
                         threaded=threaded, name="vsock")
        self.config = bytearray(struct.pack("<Q", guest_cid))
        self.conns: dict[tuple[int, int], Connection] = {}
        self._waiting: dict[int, Connection] = {}          # AWAIT_LINE, by fd
        self._rx_pending: dict[tuple[int, int], Connection] = {}
        self._stateless: deque[bytes] = deque()             # RSTs for unknown connections
        self._next_port = FIRST_LOCAL_PORT
        self._event_pending = 0
        self._batched: dict[tuple[int, int], Connection] = {}
        self._rx_more: list[tuple[int, int]] = []          # (head, used) after the current one
        self.worker.register(self.listener.fileno(), selectors.EVENT_READ, self._accept)

    # -- packets -------------------------------------------------------------------

    def _hdr(self, conn: Connection | None, op: int, length: int = 0, flags: int = 0,
             local_port: int = 0, peer_port: int = 0) -> bytes:
        if conn is not None:
            local_port, peer_port = conn.local_port, conn.peer_port
            conn.fwd_cnt_sent = conn.fwd_cnt
            fwd = conn.fwd_cnt & 0xFFFFFFFF
        else:
            fwd = 0
        return HDR.pack(HOST_CID, self.guest_cid, local_port, peer_port, length,
                        TYPE_STREAM, op, flags, self.buf_alloc, fwd)

    def _send_ctrl(self, conn: Connection, op: int, flags: int = 0) -> None:
        conn.ctrl.append((op, flags))
        self._rx_pending[conn.key] = conn

    def _rst_unknown(self, src_port: int, dst_port: int) -> None:
        """An RST for a packet that names no connection we have."""
        if len(self._stateless) < 1024:
            self._stateless.append(self._hdr(None, OP_RST, local_port=dst_port,
                                             peer_port=src_port))

    # -- host side: the listener and the CONNECT handshake ------------------------------

    def _accept(self, _mask: int) -> None:
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        sock.setblocking(False)
        if len(self.conns) + len(self._waiting) >= self.max_connections:
            sock.close()
            return
        conn = Connection(sock, 0, 0, AWAIT_LINE)
        self._waiting[sock.fileno()] = conn
        self.worker.register(sock.fileno(), selectors.EVENT_READ, self._line_ready(conn))

    def _line_ready(self, conn: Connection):
        def ready(_mask: int) -> None:
            self._read_line(conn)
        return ready

    def _read_line(self, conn: Connection) -> None:
        sock = conn.sock
        fd = sock.fileno()
        try:
            peek = sock.recv(MAX_LINE, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            peek = b""
        nl = peek.find(b"\n")
        if nl < 0:
            if not peek or len(peek) >= MAX_LINE:
                self._drop_waiting(conn)
            return
        line = sock.recv(nl + 1)
        port = _parse_connect(line)
        if port is None or not self.active:
            self._drop_waiting(conn)
            return
        self.worker.unregister(fd)
        del self._waiting[fd]
        conn.local_port = self._alloc_port()
        conn.peer_port = port
        conn.state = LOCAL_INIT
        self._add(conn)
        self._send_ctrl(conn, OP_REQUEST)
        self._expire(conn, LOCAL_INIT)
        self._fill_rx()

    def _expire(self, conn: Connection, state: str) -> None:
        """Reset ``conn`` if it is still in ``state`` after the timeout."""
        def check() -> None:
            if self.conns.get(conn.key) is conn and conn.state == state:
                log.debug("vsock: %r timed out", conn)
                self._close(conn, rst=True)
                self._fill_rx()
        self.worker.call_later(self.timeout, check)

    def _drop_waiting(self, conn: Connection) -> None:
        fd = conn.sock.fileno()
        self.worker.unregister(fd)
        self._waiting.pop(fd, None)
        conn.sock.close()

    def _alloc_port(self) -> int:
        used = {c.local_port for c in self.conns.values()}
        while True:
            port = self._next_port
            self._next_port = FIRST_LOCAL_PORT if port >= 0xFFFFFFFE else port + 1
            if port not in used:
                return port

    def _add(self, conn: Connection) -> None:
        self.conns[conn.key] = conn
        self._watch(conn)

    def _watch(self, conn: Connection) -> None:
        """Watch the socket for what the connection can use now."""
        if conn.sock.fileno() < 0:
            return
        events = 0
        if conn.state == ESTABLISHED and not conn.readable and not conn.eof \
                and not conn.peer_shut & SHUTDOWN_RCV:
            events |= selectors.EVENT_READ
        if conn.tx_buf:
            events |= selectors.EVENT_WRITE
        fd = conn.sock.fileno()
        if events == conn.events:
            return
        if conn.events and events:
            self.worker.modify(fd, events, self._sock_ready(conn))
        elif events:
            self.worker.register(fd, events, self._sock_ready(conn))
        else:
            self.worker.unregister(fd)
        conn.events = events

    def _sock_ready(self, conn: Connection):
        def ready(mask: int) -> None:
            if self.conns.get(conn.key) is not conn:
                return
            if mask & selectors.EVENT_WRITE:
                self._flush(conn)
            if mask & selectors.EVENT_READ and self.conns.get(conn.key) is conn:
                conn.readable = True
                self._rx_pending[conn.key] = conn
                self._watch(conn)
            self._fill_rx()
        return ready

    def _close(self, conn: Connection, rst: bool) -> None:
        """Forget a connection; ``rst`` tells the guest."""
        if self.conns.get(conn.key) is conn:
            del self.conns[conn.key]
        self._rx_pending.pop(conn.key, None)
        if self._batched.get(conn.key) is conn:
            del self._batched[conn.key]
        conn.batch = []
        conn.batch_len = 0
        fd = conn.sock.fileno()
        if fd >= 0:
            self.worker.unregister(fd)
        conn.sock.close()
        conn.state = CLOSING
        if rst:
            self._rst_unknown(conn.peer_port, conn.local_port)

    # -- guest -> host ---------------------------------------------------------------------

    def process_queue(self, index: int) -> None:
        if index == TX:
            self._serve_tx()
            self._fill_rx()
        elif index == RX:
            self._fill_rx()
        else:
            self._fill_events()

    def _serve_tx(self) -> None:
        """Serve every transmit chain; a pass's data goes out per connection
        in one sendmsg before its chains are returned (their memory is what
        is sent), and notifications are re-armed race-free."""
        q = self.queues[TX]
        while self.active:
            q.disable_notification()
            heads: list[int] = []
            views = 0
            for chain in self.chains(TX):
                try:
                    self._tx_packet(chain)
                except ChainError as exc:
                    q.errors += 1
                    log.debug("vsock: %s", exc)
                heads.append(chain.head)
                views += len(chain.readable)
                if views >= MAX_BATCH_VIEWS:
                    self._send_batches()
                    for head in heads:
                        q.push(head, 0)
                    heads, views = [], 0
            self._send_batches()
            for head in heads:
                q.push(head, 0)
            if not self.active or not q.enable_notification():
                break
        self.signal_used(TX)

    def _send_batches(self) -> None:
        while self._batched:
            _, conn = self._batched.popitem()
            self._send_batch(conn)

    def _send_batch(self, conn: Connection) -> None:
        """Hand the connection's gathered data to its socket; what it does
        not take is copied out of guest memory to wait for it."""
        views = conn.batch
        if not views:
            return
        conn.batch = []
        conn.batch_len = 0
        self._batched.pop(conn.key, None)
        if self.conns.get(conn.key) is not conn:
            return                               # closed meanwhile: the data goes nowhere
        sent = 0
        if not conn.tx_buf:
            try:
                sent = conn.sock.sendmsg(views)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._close(conn, rst=True)
                return
            self._credit(conn, sent)
        skip = sent
        for v in views:
            if skip >= len(v):
                skip -= len(v)
                continue
            conn.tx_buf += v[skip:]
            skip = 0
        self._watch(conn)

    def _tx_packet(self, chain: Chain) -> int:
        r = chain.reader()
        if r.remaining < HDR.size:
            return 0
        (src_cid, dst_cid, src_port, dst_port, length, ptype, op, flags,
         buf_alloc, fwd_cnt) = HDR.unpack(r.read(HDR.size))
        if src_cid != self.guest_cid or dst_cid != HOST_CID:
            return 0                                 # not ours to answer: dropped
        if ptype != TYPE_STREAM or length > r.remaining or length > MAX_PKT:
            if op != OP_RST:
                self._rst_unknown(src_port, dst_port)
            return 0
        key = (dst_port, src_port)
        conn = self.conns.get(key)
        if conn is not None:
            conn.peer_buf_alloc = buf_alloc
            conn.peer_fwd_cnt = fwd_cnt
            if conn.batch and op != OP_RW:
                self._send_batch(conn)           # keep the stream's order
                conn = self.conns.get(key)
        if op == OP_REQUEST:
            if conn is not None:
                self._close(conn, rst=True)
            else:
                self._guest_connect(src_port, dst_port, buf_alloc, fwd_cnt)
            return 0
        if conn is None:
            if op != OP_RST:
                self._rst_unknown(src_port, dst_port)
            return 0
        if op == OP_RST:
            self._close(conn, rst=False)
        elif op == OP_RESPONSE:
            if conn.state != LOCAL_INIT:
                self._close(conn, rst=True)
                return 0
            try:
                conn.sock.send(f"OK {conn.local_port}\n".encode())
            except OSError:
                self._close(conn, rst=True)
                return 0
            conn.state = ESTABLISHED
            self._watch(conn)
        elif op == OP_RW:
            if conn.state != ESTABLISHED:
                self._close(conn, rst=True)
                return 0
            self._guest_data(conn, r.take(length))
        elif op == OP_CREDIT_UPDATE:
            if conn.readable:
                self._rx_pending[conn.key] = conn
        elif op == OP_CREDIT_REQUEST:
            self._send_ctrl(conn, OP_CREDIT_UPDATE)
        elif op == OP_SHUTDOWN:
            conn.peer_shut |= flags & (SHUTDOWN_RCV | SHUTDOWN_SEND)
            if conn.peer_shut == SHUTDOWN_RCV | SHUTDOWN_SEND or conn.state == CLOSING \
                    or (conn.eof and conn.peer_shut & SHUTDOWN_SEND):
                self._close_flushed(conn)
            else:
                if conn.peer_shut & SHUTDOWN_SEND and not conn.tx_buf:
                    _shut(conn.sock, socket.SHUT_WR)
                self._watch(conn)
        else:
            self._close(conn, rst=True)
        return 0

    def _guest_connect(self, src_port: int, dst_port: int, buf_alloc: int,
                       fwd_cnt: int) -> None:
        if len(self.conns) >= self.max_connections:
            self._rst_unknown(src_port, dst_port)
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            sock.connect(f"{self.uds_path}_{dst_port}")
        except OSError as exc:
            log.debug("vsock: guest port %d -> %s_%d: %s", src_port, self.uds_path,
                      dst_port, exc)
            sock.close()
            self._rst_unknown(src_port, dst_port)
            return
        conn = Connection(sock, dst_port, src_port, ESTABLISHED)
        conn.peer_buf_alloc = buf_alloc
        conn.peer_fwd_cnt = fwd_cnt
        self._add(conn)
        self._send_ctrl(conn, OP_RESPONSE)

    def _guest_data(self, conn: Connection, views: list[memoryview]) -> None:
        """Gather a data packet for the pass's sendmsg (``_send_batch``)."""
        n = sum(len(v) for v in views)
        if conn.peer_shut & SHUTDOWN_SEND:
            self._close(conn, rst=True)
            return
        if len(conn.tx_buf) + conn.batch_len + n > self.buf_alloc:
            log.debug("vsock: %r: guest exceeded its credit", conn)
            self._close(conn, rst=True)
            return
        conn.batch.extend(views)
        conn.batch_len += n
        self._batched[conn.key] = conn

    def _flush(self, conn: Connection) -> None:
        if not conn.tx_buf:
            return
        try:
            sent = conn.sock.send(conn.tx_buf)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn, rst=True)
            return
        del conn.tx_buf[:sent]
        self._credit(conn, sent)
        if not conn.tx_buf and conn.close_flushed:
            self._close(conn, rst=True)
            return
        if not conn.tx_buf and conn.peer_shut & SHUTDOWN_SEND:
            _shut(conn.sock, socket.SHUT_WR)
        self._watch(conn)

    def _close_flushed(self, conn: Connection) -> None:
        """Both sides are done: reset the connection once the host socket
        has taken the guest's last bytes (or the timeout passed)."""
        if not conn.tx_buf:
            self._close(conn, rst=True)
            return
        conn.close_flushed = True
        if conn.state != CLOSING:
            conn.state = CLOSING
            self._expire(conn, CLOSING)
        self._watch(conn)

    def _credit(self, conn: Connection, sent: int) -> None:
        conn.fwd_cnt = (conn.fwd_cnt + sent) & 0xFFFFFFFF
        if (conn.fwd_cnt - conn.fwd_cnt_sent) & 0xFFFFFFFF >= self.buf_alloc // 4 \
                and OP_CREDIT_UPDATE not in (op for op, _ in conn.ctrl):
            self._send_ctrl(conn, OP_CREDIT_UPDATE)

    # -- host -> guest ---------------------------------------------------------------------

    def _fill_rx(self) -> None:
        """Put pending control packets and socket data in the guest's rx buffers."""
        q = self.queues[RX]
        if not self.active or not q.ready:
            return
        while self._stateless or self._rx_pending:
            progressed = False
            for chain in self.chains(RX):
                used = self._rx_one(chain)
                if used is None:            # nothing to send after all: give it back
                    q.undo_pop()
                    break
                q.push(chain.head, used)
                for head, n in self._rx_more:   # more buffers the same read filled
                    q.push(head, n)
                self._rx_more.clear()
                progressed = True
                if not (self._stateless or self._rx_pending):
                    break
            else:
                # out of rx buffers: ask to be told when the guest adds some
                if not q.enable_notification():
                    break
                continue
            if not progressed:
                break
        self.signal_used(RX)

    def _rx_one(self, chain: Chain) -> int | None:
        """Fill one rx chain; None if nothing was pending after all."""
        if chain.write_len < HDR.size:
            self.queues[RX].errors += 1
            return 0
        while True:
            w = chain.writer()
            hdr_views = w.take(HDR.size)
            if self._stateless:
                _scatter(hdr_views, self._stateless.popleft())
                return HDR.size
            if not self._rx_pending:
                return None
            key, conn = next(iter(self._rx_pending.items()))
            del self._rx_pending[key]
            if conn.ctrl:
                op, flags = conn.ctrl.popleft()
                _scatter(hdr_views, self._hdr(conn, op, flags=flags))
                if conn.ctrl or conn.readable:
                    self._rx_pending[key] = conn
                return HDR.size
            if not conn.readable or conn.state != ESTABLISHED:
                continue
            budget = conn.peer_credit()
            if budget > 0 and w.remaining == 0:
                # room for a header only: no use for data, which waits for
                # the next buffer (the connection stays pending)
                self._rx_pending[key] = conn
                return 0
            credit = min(budget, w.remaining, MAX_PKT)
            if credit <= 0:
                continue                     # wait for the guest's credit update
            try:
                n = conn.sock.recvmsg_into(w.take(credit))[0]
            except BlockingIOError:
                conn.readable = False
                self._watch(conn)
                continue
            except OSError:
                self._close(conn, rst=True)
                continue
            if n == 0:
                conn.readable = False
                conn.eof = True
                if _hung_up(conn.sock):
                    # the host closed its socket: nothing more either way
                    conn.state = CLOSING
                    flags = SHUTDOWN_RCV | SHUTDOWN_SEND
                    self._expire(conn, CLOSING)
                else:
                    # shutdown(SHUT_WR): the host sends no more but still reads
                    flags = SHUTDOWN_SEND
                _scatter(hdr_views, self._hdr(conn, OP_SHUTDOWN, flags=flags))
                self._watch(conn)
                return HDR.size
            extra = self._read_more(conn, budget - n) if n == credit else 0
            conn.rx_cnt = (conn.rx_cnt + n + extra) & 0xFFFFFFFF
            _scatter(hdr_views, self._hdr(conn, OP_RW, length=n))
            self._rx_pending[key] = conn     # keep reading, round robin
            return HDR.size + n

    def _read_more(self, conn: Connection, budget: int) -> int:
        """The first buffer came back full: read on into further rx
        buffers with one more recvmsg_into (queued in ``_rx_more`` after
        the current one); returns the bytes read. Errors and end of stream
        are left for the next read to find."""
        more = self._more_rx_buffers(budget) if budget > 0 else []
        if not more:
            return 0
        views: list[memoryview] = []
        for _, _, payload in more:
            views.extend(payload)
        try:
            left = total = conn.sock.recvmsg_into(views)[0]
        except OSError:
            left = total = 0
        unused = 0
        for head, hdr_views, payload in more:
            k = min(left, sum(len(v) for v in payload))
            if k == 0:
                unused += 1
                continue
            _scatter(hdr_views, self._hdr(conn, OP_RW, length=k))
            self._rx_more.append((head, HDR.size + k))
            left -= k
        for _ in range(unused):              # the tail the read did not reach
            self.queues[RX].undo_pop()
        return total

    def _more_rx_buffers(self, budget: int) -> list[tuple[int, list[memoryview],
                                                          list[memoryview]]]:
        """Take further rx chains for one read of a connection's data, up
        to ``budget`` bytes of payload: (head, header views, payload views)
        each. A chain that is not a plain usable buffer is given back and
        ends the gathering (``_fill_rx`` deals with it on its own)."""
        q = self.queues[RX]
        out: list[tuple[int, list[memoryview], list[memoryview]]] = []
        while budget > 0 and len(out) < MAX_RX_BATCH - 1:
            try:
                chain = q.pop()
            except ChainError:
                q.undo_pop()
                break
            if chain is None:
                break
            if chain.write_len <= HDR.size or chain.read_len:
                q.undo_pop()
                break
            w = chain.writer()
            hdr_views = w.take(HDR.size)
            k = min(budget, w.remaining, MAX_PKT)
            out.append((chain.head, hdr_views, w.take(k)))
            budget -= k
        return out

    def _fill_events(self) -> None:
        q = self.queues[EVENT]
        while self._event_pending:
            chain = None
            for chain in self.chains(EVENT):
                break
            if chain is None:
                return
            w = chain.writer()
            if w.remaining >= 4:
                w.write(struct.pack("<I", EVENT_TRANSPORT_RESET))
            q.push(chain.head, w.done)
            self._event_pending -= 1
        self.signal_used(EVENT)

    def send_transport_reset(self) -> None:
        """Tell the guest every connection is gone (after a snapshot restore)."""
        with self.lock:
            for conn in list(self.conns.values()):
                self._close(conn, rst=False)
            self._event_pending += 1
            self._fill_events()

    # -- lifecycle ----------------------------------------------------------------------------

    def restore(self, state: dict) -> None:
        """Resume a snapshot: host connections did not survive, so the guest
        is told to drop its own (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET)."""
        super().restore(state)
        with self.lock:
            if self.active:
                self.send_transport_reset()

    def on_reset(self) -> None:
        for conn in list(self.conns.values()):
            self._close(conn, rst=False)
        for conn in list(self._waiting.values()):
            self._drop_waiting(conn)
        self._stateless.clear()
        self._rx_pending.clear()
        self._rx_more.clear()
        self._batched.clear()
        self._event_pending = 0

    def on_close(self) -> None:
        self.on_reset()
        self.listener.close()
        try:
            if stat.S_ISSOCK(os.lstat(self.uds_path).st_mode):
                os.unlink(self.uds_path)
        except OSError:
            pass

    def connections(self) -> list[tuple[int, int, str]]:
        """(host port, guest port, state) of every connection, for tests and tools."""
        with self.lock:
            return [(c.local_port, c.peer_port, c.state) for c in self.conns.values()]


def _scatter(views: list[memoryview], data: bytes) -> None:
    pos = 0
    for v in views:
        v[:] = data[pos:pos + len(v)]
        pos += len(v)


def _hung_up(sock: socket.socket) -> bool:
    """After reading EOF: True if the host closed the socket, False if it
    only shut down its sending side (a UNIX socket reports POLLHUP only
    when both directions are shut)."""
    p = select.poll()
    p.register(sock.fileno(), select.POLLIN)
    return any(ev & (select.POLLHUP | select.POLLERR) for _, ev in p.poll(0))


def _shut(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass


def _parse_connect(line: bytes) -> int | None:
    parts = line.strip().split()
    if len(parts) != 2 or parts[0] != b"CONNECT" or not parts[1].isdigit():
        return None
    port = int(parts[1])
    return port if port <= 0xFFFFFFFF else None


def _listen(path: str) -> socket.socket:
    """Bind the host-side socket; a stale socket file (nobody listening)
    is replaced, a live one or a missing directory is a ConfigError."""
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise ConfigError(f"vsock: directory {directory!r} of {path!r} does not exist")
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ConfigError(f"vsock: {path!r} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise ConfigError(f"vsock: {path!r}: {exc.strerror}") from exc
            os.unlink(path)
        else:
            raise ConfigError(f"vsock: {path!r} is in use by another process")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"vsock: cannot listen on {path!r}: {exc.strerror}") from exc
    sock.setblocking(False)
    return sock
