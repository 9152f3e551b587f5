"""virtio-net (virtio 1.2, 5.1) on a tap device.

One receive and one transmit queue (no multiqueue, no control queue).
Every packet carries the 12-byte ``virtio_net_hdr_v1``, which is exactly
what a tap with IFF_VNET_HDR reads and writes, so frames move between the
tap and guest RAM with ``readv``/``writev`` on views of the guest's buffers
and no copy in Python. Checksum and TSO offloads are offered to the guest;
what the guest accepts is passed on to the tap (TUNSETOFFLOAD), so the
kernel never hands the guest a packet it cannot take. Both directions run
on the device's worker thread: the tap fd and the queues' eventfds wake it.

The backend is any object with ``fd`` (packet-per-read semantics, the vnet
header in front) and ``set_offload(flags)``: ``hvkit.net.tap.Tap``, or a
SOCK_SEQPACKET socketpair in tests.
"""
from __future__ import annotations

import errno
import logging
import os
import selectors
import struct
from typing import Protocol

from hvkit.devices.virtio import spec as V
from hvkit.devices.virtio.chain import ChainError, QueueBroken
from hvkit.devices.virtio.device import VirtioDevice
from hvkit.errors import ConfigError
from hvkit.memory.guest import GuestMemory

log = logging.getLogger(__name__)

RX = 0
TX = 1
QUEUE_SIZE = 256
HDR_SIZE = 12
#: the largest frame a TSO packet makes, plus the header
MAX_PACKET = HDR_SIZE + 65550

F_CSUM = 0
F_GUEST_CSUM = 1
F_MTU = 3
F_MAC = 5
F_GUEST_TSO4 = 7
F_GUEST_TSO6 = 8
F_GUEST_ECN = 9
F_HOST_TSO4 = 11
F_HOST_TSO6 = 12
F_HOST_ECN = 13
F_STATUS = 16

S_LINK_UP = 1

# TUNSETOFFLOAD bits (linux/if_tun.h)
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08

_CONFIG = struct.Struct("<6sHHH")


class NetBackend(Protocol):
    fd: int

    def set_offload(self, flags: int) -> None: ...

    def close(self) -> None: ...


def parse_mac(mac: str | bytes | None) -> bytes:
    """A MAC as 6 bytes; None gives a random locally administered unicast one."""
    if mac is None:
        raw = bytearray(os.urandom(6))
        raw[0] = (raw[0] & 0xFC) | 0x02
        return bytes(raw)
    if isinstance(mac, bytes):
        if len(mac) != 6:
            raise ConfigError(f"MAC must be 6 bytes, got {len(mac)}")
        return mac
    parts = mac.split(":")
    try:
        raw = bytes(int(p, 16) for p in parts)
    except ValueError:
        raw = b""
    if len(parts) != 6 or len(raw) != 6 or any(len(p) != 2 for p in parts):
        raise ConfigError(f"MAC {mac!r} is not aa:bb:cc:dd:ee:ff")
    if raw[0] & 1:
        raise ConfigError(f"MAC {mac} is a multicast address")
    return raw


class VirtioNet(VirtioDevice):
    device_id = V.ID_NET
    pci_class = 0x020000

    def __init__(self, mem: GuestMemory, backend: NetBackend, *,
                 mac: str | bytes | None = None, mtu: int | None = None,
                 offloads: bool = True, close_backend: bool = True,
                 queue_size: int = QUEUE_SIZE, threaded: bool = True) -> None:
        self.backend = backend
        self.close_backend = close_backend
        self.mac = parse_mac(mac)
        if mtu is not None and not 68 <= mtu <= 65535:
            raise ConfigError(f"virtio-net MTU {mtu} must be 68..65535")
        features = (1 << F_MAC) | (1 << F_STATUS)
        if mtu is not None:
            features |= 1 << F_MTU
        if offloads:
            features |= ((1 << F_CSUM) | (1 << F_GUEST_CSUM) | (1 << F_HOST_TSO4)
                         | (1 << F_HOST_TSO6) | (1 << F_HOST_ECN) | (1 << F_GUEST_TSO4)
                         | (1 << F_GUEST_TSO6) | (1 << F_GUEST_ECN))
        super().__init__(mem, [queue_size, queue_size], features=features,
                         threaded=threaded, name="net")
        self.link_up = True
        self.config = bytearray(_CONFIG.pack(self.mac, S_LINK_UP, 1, mtu or 1500))
        #: packets and bytes each way, and packets dropped (too big, bad, no room)
        self.stats = {"rx_packets": 0, "rx_bytes": 0, "tx_packets": 0, "tx_bytes": 0,
                      "rx_dropped": 0, "tx_dropped": 0}
        self._tap_watched = False
        self._tap_readable = False
        self._tx_blocked = False
        os.set_blocking(backend.fd, False)

    # -- link ------------------------------------------------------------------

    def set_link(self, up: bool) -> None:
        """Report the link up or down to the guest (a configuration change)."""
        with self.lock:
            self.link_up = bool(up)
            struct.pack_into("<H", self.config, 6, S_LINK_UP if up else 0)
            self.config_changed()

    # -- activation --------------------------------------------------------------

    def on_activate(self) -> None:
        flags = 0
        if self.negotiated(F_GUEST_CSUM):
            flags |= TUN_F_CSUM
            if self.negotiated(F_GUEST_TSO4):
                flags |= TUN_F_TSO4
            if self.negotiated(F_GUEST_TSO6):
                flags |= TUN_F_TSO6
            if self.negotiated(F_GUEST_ECN) and flags & (TUN_F_TSO4 | TUN_F_TSO6):
                flags |= TUN_F_TSO_ECN
        self.backend.set_offload(flags)
        self._tap_readable = True           # find out on the first rx pass
        self._watch_tap()

    def on_reset(self) -> None:
        self._tap_readable = False
        self._tx_blocked = False
        self._watch_tap()

    def _watch_tap(self) -> None:
        """Watch the tap for reading while the guest can take packets, and
        for writing while a transmit is blocked on it."""
        events = 0
        if self.active and not self._tap_readable:
            events |= selectors.EVENT_READ
        if self.active and self._tx_blocked:
            events |= selectors.EVENT_WRITE
        fd = self.backend.fd
        if events and self._tap_watched:
            self.worker.modify(fd, events, self._tap_ready)
        elif events:
            self.worker.register(fd, events, self._tap_ready)
        elif self._tap_watched:
            self.worker.unregister(fd)
        self._tap_watched = bool(events)

    def _tap_ready(self, mask: int) -> None:
        if not self.active:
            return
        try:
            if mask & selectors.EVENT_READ:
                self._tap_readable = True
            if mask & selectors.EVENT_WRITE:
                self._tx_blocked = False
                self._transmit()
            if mask & selectors.EVENT_READ:
                self._receive()
        except QueueBroken as exc:
            self.needs_reset(str(exc))
        except Exception as exc:
            log.exception("virtio-net: tap service failed")
            self.needs_reset(f"tap: {type(exc).__name__}: {exc}")
        self._watch_tap()

    # -- queues --------------------------------------------------------------------

    def process_queue(self, index: int) -> None:
        if index == TX:
            self._transmit()
        else:
            self._receive()
        self._watch_tap()

    def _transmit(self) -> None:
        q = self.queues[TX]
        fd = self.backend.fd
        writev, push = os.writev, q.push
        packets = nbytes = dropped = 0
        try:
            while self.active and not self._tx_blocked:
                q.disable_notification()
                for chain in self.chains(TX):
                    n = chain.read_len
                    if chain.write_len or not HDR_SIZE <= n <= MAX_PACKET:
                        dropped += 1
                        q.errors += 1
                        push(chain.head, 0)
                        continue
                    try:
                        writev(fd, chain.readable)
                    except BlockingIOError:
                        q.undo_pop()
                        self._tx_blocked = True
                        break
                    except OSError as exc:
                        # the tap refuses a malformed packet (bad GSO header, say)
                        log.debug("virtio-net: tap write: %s", exc)
                        dropped += 1
                    else:
                        packets += 1
                        nbytes += n - HDR_SIZE
                    push(chain.head, 0)
                if self._tx_blocked or not q.enable_notification():
                    break
        finally:
            stats = self.stats
            stats["tx_packets"] += packets
            stats["tx_bytes"] += nbytes
            stats["tx_dropped"] += dropped
        self.signal_used(TX)

    def _receive(self) -> None:
        q = self.queues[RX]
        fd = self.backend.fd
        done = 0
        while self.active and self._tap_readable:
            try:
                chain = q.pop()
            except ChainError as exc:      # malformed: return it unused
                q.errors += 1
                if exc.head is not None:
                    q.push(exc.head, 0)
                continue
            if chain is None:
                if q.enable_notification():
                    continue
                break                       # no buffers: wait for the guest's kick
            if chain.read_len or chain.write_len < HDR_SIZE:
                q.errors += 1
                q.push(chain.head, 0)
                continue
            try:
                n = os.readv(fd, chain.writable)
            except BlockingIOError:
                q.undo_pop()
                self._tap_readable = False
                break
            except OSError as exc:
                if exc.errno not in (errno.EFAULT, errno.EINVAL, errno.EMSGSIZE):
                    raise
                # the frame did not fit the guest's buffer: it is dropped
                q.undo_pop()
                self.stats["rx_dropped"] += 1
                continue
            if n < HDR_SIZE:
                q.undo_pop()
                self.stats["rx_dropped"] += 1
                continue
            _set_num_buffers(chain.writable)
            q.push(chain.head, n)
            self.stats["rx_packets"] += 1
            self.stats["rx_bytes"] += n - HDR_SIZE
            done += 1
            if done % 64 == 0:
                self.signal_used(RX)
        self.signal_used(RX)

    def on_close(self) -> None:
        if self._tap_watched:
            self.worker.unregister(self.backend.fd)
            self._tap_watched = False
        if self.close_backend:
            self.backend.close()


def _set_num_buffers(views: list[memoryview]) -> None:
    """num_buffers (header bytes 10-11) is 1: each packet uses one chain.
    The tap leaves those bytes alone, so the device writes them."""
    value = b"\x01\x00"
    first = views[0]
    if len(first) >= HDR_SIZE:              # the header in one buffer: the usual case
        first[10:12] = value
        return
    pos = 0
    for v in views:
        for i in range(len(v)):
            if 10 <= pos < 12:
                v[i] = value[pos - 10]
            pos += 1
            if pos >= 12:
                return
