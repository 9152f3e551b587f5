"""virtio-mmio and virtio-pci: registers, negotiation, interrupts, reset."""
from __future__ import annotations

import os
import struct

import pytest

from hvkit.devices.irq import RecordingLine, RecordingMsi
from hvkit.devices.pci import constants as PC
from hvkit.devices.virtio import spec as V
from hvkit.devices.virtio.device import VirtioDevice
from hvkit.devices.virtio.driver import MmioDriver, PciDriver, wait_for
from hvkit.devices.virtio.mmio import VirtioMmioTransport, cmdline_token
from hvkit.devices.virtio.pci import VirtioPciTransport
from hvkit.memory.guest import GuestMemory

MEM = 1 << 20


class Echo(VirtioDevice):
    """Copies each chain's readable bytes into its writable part."""

    device_id = 42

    def __init__(self, mem, threaded=False):
        super().__init__(mem, [8, 4], features=1 << 3, threaded=threaded, name="echo")
        self.config = bytearray(b"ECHOCONF")
        self.activated = 0

    def on_activate(self):
        self.activated += 1

    def process_queue(self, index):
        def handle(chain):
            data = chain.reader().read(chain.read_len)
            w = chain.writer()
            w.write(data[:w.remaining])
            return w.done
        self.drain(index, handle)


@pytest.fixture
def mem():
    m = GuestMemory.create(MEM)
    yield m
    m.close()


def test_cmdline_token():
    assert cmdline_token(0xD000_0000, 5) == "virtio_mmio.device=4K@0xd0000000:5"
    assert cmdline_token(0x1000, 12, size=0x200) == "virtio_mmio.device=512@0x1000:12"


def test_mmio_identity_registers(mem):
    t = VirtioMmioTransport(Echo(mem))
    r = lambda off: struct.unpack("<I", t.read(off, 4))[0]
    assert r(0x000) == 0x74726976
    assert r(0x004) == 2
    assert r(0x008) == 42
    assert r(0x0B0) == 0xFFFFFFFF                    # no shared memory
    assert t.read(0x100, 8) == b"ECHOCONF"
    assert t.read(0x100 + 6, 4) == b"NF\0\0"
    assert t.read(0x003, 1) == b"\0"                  # sub-word register access: ignored


@pytest.mark.parametrize("threaded", [False, True])
def test_mmio_round_trip(mem, threaded):
    dev = Echo(mem, threaded=threaded)
    irq = RecordingLine()
    t = VirtioMmioTransport(dev, irq)
    drv = MmioDriver(t, mem)
    features = drv.setup()
    assert features >> V.F_VERSION_1 & 1 and features >> V.F_EVENT_IDX & 1
    assert not features >> V.F_ACCESS_PLATFORM & 1
    assert dev.activated == 1 and dev.active
    q = drv.queues[0]
    q.add([b"ping"], [4])
    drv.kick(0)
    [(_, n, data)] = q.wait(1)
    assert (n, data) == (4, b"ping")
    wait_for(lambda: irq.level)
    assert drv.interrupt_status() == V.INT_VRING
    drv.ack(V.INT_VRING)
    assert not irq.level and drv.interrupt_status() == 0
    dev.close()


def test_mmio_features_refused_without_version_1(mem):
    dev = Echo(mem)
    drv = MmioDriver(VirtioMmioTransport(dev), mem)
    drv.set_status(V.STATUS_ACKNOWLEDGE | V.STATUS_DRIVER)
    drv.write_driver_features(1 << 3)
    drv.set_status(V.STATUS_ACKNOWLEDGE | V.STATUS_DRIVER | V.STATUS_FEATURES_OK)
    assert not drv.status() & V.STATUS_FEATURES_OK
    drv.write_driver_features((1 << V.F_VERSION_1) | (1 << 60))   # not offered
    drv.set_status(V.STATUS_ACKNOWLEDGE | V.STATUS_DRIVER | V.STATUS_FEATURES_OK)
    assert not drv.status() & V.STATUS_FEATURES_OK


def test_mmio_bad_ring_sets_needs_reset_and_config_interrupt(mem):
    dev = Echo(mem)
    irq = RecordingLine()
    t = VirtioMmioTransport(dev, irq)
    drv = MmioDriver(t, mem)
    drv.setup()
    drv.queues[0].set_avail_idx(100)          # far beyond the queue size
    drv.kick(0)
    assert drv.status() & V.STATUS_DEVICE_NEEDS_RESET
    assert drv.interrupt_status() & V.INT_CONFIG and irq.level
    assert "avail idx" in dev.reset_reason
    drv.set_status(0)                           # reset recovers
    assert drv.status() == 0 and not irq.level
    drv.setup()
    drv.queues[0].add([b"ok"], [2])
    drv.kick(0)
    assert drv.queues[0].wait(1)[0][2] == b"ok"


def test_mmio_ring_outside_ram_on_ready(mem):
    dev = Echo(mem)
    t = VirtioMmioTransport(dev, RecordingLine())
    drv = MmioDriver(t, mem)
    drv.set_status(1)
    drv.set_status(3)
    drv.write_driver_features(1 << V.F_VERSION_1)
    drv.set_status(11)
    drv.w32(0x30, 0)
    drv.w32(0x80, MEM - 16)
    drv.w32(0x44, 1)
    assert drv.r32(0x44) == 0
    assert drv.status() & V.STATUS_DEVICE_NEEDS_RESET


def test_mmio_queue_layout_frozen_while_ready(mem):
    dev = Echo(mem)
    t = VirtioMmioTransport(dev)
    drv = MmioDriver(t, mem)
    drv.setup()
    before = dev.queues[0].desc_addr
    drv.w32(0x30, 0)
    drv.w32(0x80, 0x5000)
    assert dev.queues[0].desc_addr == before
    drv.w32(0x30, 7)                            # no such queue
    assert drv.r32(0x34) == 0
    drv.w32(0x80, 0x5000)                        # ignored


def test_mmio_notify_regions(mem):
    dev = Echo(mem)
    t = VirtioMmioTransport(dev)
    regions = t.notify_regions()
    assert [(r.queue, r.offset, r.datamatch) for r in regions] == [(0, 0x50, 0), (1, 0x50, 1)]
    assert regions[1].fd == dev.notify_fd(1)


def test_eventfd_notification_reaches_worker(mem):
    """What an ioeventfd does: signal the eventfd, no register write."""
    dev = Echo(mem, threaded=True)
    drv = MmioDriver(VirtioMmioTransport(dev), mem)
    drv.setup()
    q = drv.queues[1]
    q.add([b"abc"], [3])
    os.eventfd_write(dev.notify_fd(1), 1)
    assert q.wait(1)[0][2] == b"abc"
    dev.close()


# -- PCI ------------------------------------------------------------------------------


def pci(mem, threaded=False):
    dev = Echo(mem, threaded=threaded)
    msi = RecordingMsi()
    t = VirtioPciTransport(dev, msi)
    return dev, t, msi, PciDriver(t, mem)


def caps(t):
    out = {}
    for cap_id, off in t.config.capabilities():
        if cap_id == 0x09:
            cap_len, cfg_type, bar = t.config.data[off + 2], t.config.data[off + 3], t.config.data[off + 4]
            offset, length = struct.unpack_from("<II", t.config.data, off + 8)
            out[cfg_type] = (off, cap_len, bar, offset, length)
    return out


def test_pci_identity_and_capabilities(mem):
    dev, t, _, _ = pci(mem)
    assert t.config.get_u16(PC.VENDOR_ID) == 0x1AF4
    assert t.config.get_u16(PC.DEVICE_ID) == 0x1040 + 42
    assert t.config.get_u8(PC.REVISION_ID) == 1
    c = caps(t)
    assert set(c) == {1, 2, 3, 4, 5}
    assert c[1][2:] == (0, 0x0000, 0x40)
    assert c[3][2:] == (0, 0x1000, 4)
    assert c[4][2:] == (0, 0x2000, 0x1000)
    off = c[2][0]
    assert c[2][1] == 20 and struct.unpack_from("<I", t.config.data, off + 16)[0] == 4
    assert any(cap_id == PC.CAP_ID_MSIX for cap_id, _ in t.config.capabilities())
    assert t.bar_read(0x2000, 8) == b"ECHOCONF"


def test_pci_round_trip_with_intx(mem):
    dev, t, msi, drv = pci(mem)
    line = RecordingLine()
    t.attach_intx(line, 11)
    drv.setup()
    q = drv.queues[0]
    q.add([b"pci!"], [4])
    drv.kick(0)
    assert q.wait(1)[0][2] == b"pci!"
    assert line.level and not msi.messages
    assert t.bar_read(0x1000, 1) == bytes([V.INT_VRING])
    assert not line.level
    assert t.bar_read(0x1000, 1) == b"\0"         # read clears


def enable_msix(t, vectors):
    cap = t.msix.cap_offset
    ctrl = t.config.get_u16(cap + 2)
    t.config_write(cap + 2, struct.pack("<H", ctrl | 0x8000))
    for i in range(vectors):
        for j, word in enumerate((0xFEE00000, 0, 0x40 + i, 0)):
            t.msix.write_table(16 * i + 4 * j, struct.pack("<I", word))


def test_pci_msix_per_queue_and_config_vectors(mem):
    dev, t, msi, drv = pci(mem)
    enable_msix(t, 3)
    drv._w(0x10, "H", 2)                           # config vector 2
    assert drv._r(0x10, "H") == 2
    drv._w(0x10, "H", 99)                          # no such vector
    assert drv._r(0x10, "H") == V.MSI_NO_VECTOR
    drv._w(0x10, "H", 2)
    drv.set_status(0)
    assert drv._r(0x10, "H") == V.MSI_NO_VECTOR    # reset clears it
    drv._w(0x10, "H", 2)
    # set up by hand to program queue vectors
    drv.set_status(1)
    drv.set_status(3)
    drv.write_driver_features(dev.avail_features)
    drv.set_status(11)
    from hvkit.devices.virtio.driver import DriverQueue
    for i, vec in ((0, 0), (1, 1)):
        q = DriverQueue(mem, drv.alloc, i, 4)
        drv.queues[i] = q
        drv.program_queue(q, vector=vec)
    assert t.queue_vector(1) == 1
    drv.set_status(15)
    drv.queues[1].add([b"v1"], [2])
    drv.kick(1)
    assert drv.queues[1].wait(1)[0][2] == b"v1"
    assert msi.messages == [(0xFEE00000, 0x41)]
    dev.needs_reset("test")
    assert msi.messages[-1] == (0xFEE00000, 0x42)
    assert drv.status() & V.STATUS_DEVICE_NEEDS_RESET


def test_pci_notify_regions_and_offsets(mem):
    dev, t, _, drv = pci(mem)
    regions = t.notify_regions()
    assert [(r.queue, r.bar, r.offset, r.length) for r in regions] == [
        (0, 0, 0x3000, 2), (1, 0, 0x3004, 2)]
    assert drv.notify_offset(1) == 0x3004


def test_pci_cfg_access_window(mem):
    dev, t, _, drv = pci(mem)
    off = caps(t)[5][0]
    t.config_write(off + 4, b"\0")                        # bar 0
    t.config_write(off + 8, struct.pack("<I", 0x2000))    # device config
    t.config_write(off + 12, struct.pack("<I", 4))
    assert t.config_read(off + 16, 4) == b"ECHO"
    t.config_write(off + 8, struct.pack("<I", 0x0014))    # device_status, 1 byte
    t.config_write(off + 12, struct.pack("<I", 1))
    t.config_write(off + 16, b"\x01\0\0\0")
    assert dev.status == V.STATUS_ACKNOWLEDGE
    t.config_write(off + 8, struct.pack("<I", 0xFFFFFFFF))   # hostile window: ignored
    assert t.config_read(off + 16, 4) == b"\x01\0\0\0"


def test_pci_common_cfg_hostile_writes(mem):
    dev, t, _, drv = pci(mem)
    for off in range(0, 0x40):
        for size in (1, 2, 4, 8):
            t.bar_write(off, b"\xff" * size)
    t.bar_write(0x3FF0, b"\xff" * 4)
    t.bar_write(0x3004 + 4 * 100, b"\0\0")
    for off in range(0, 0x4000, 0x100):
        assert len(t.bar_read(off, 4)) == 4


def test_pci_function_reset_resets_device(mem):
    dev, t, _, drv = pci(mem)
    drv.setup()
    assert dev.active
    t.reset()
    assert dev.status == 0 and not dev.active and not dev.queues[0].ready


def test_device_state_restore(mem):
    dev, t, _, drv = pci(mem)
    drv.setup()
    q = drv.queues[0]
    q.add([b"one"], [3])
    drv.kick(0)
    q.wait(1)
    state = dev.state()
    other = Echo(mem)
    VirtioPciTransport(other)
    other.restore(state)
    assert other.active and other.queues[0].used_idx == 1
    q.add([b"two"], [3])
    other.notify(0)
    assert q.wait(1)[0][2] == b"two"


def test_notify_addresses(mem):
    dev, t, _, _ = pci(mem)
    assert t.notify_addresses() == []              # BAR not decoded yet
    t.set_bar_address(0, 0xC000_0000)
    t.enable_decoding()
    assert t.notify_addresses() == [(0xC000_3000, 2, dev.notify_fd(0)),
                                    (0xC000_3004, 2, dev.notify_fd(1))]
    m = VirtioMmioTransport(Echo(mem))
    assert m.notify_addresses(0xD000_0000) == [
        (0xD000_0050, 4, 0, m.device.notify_fd(0)), (0xD000_0050, 4, 1, m.device.notify_fd(1))]


def test_pci_transport_state_restore(mem):
    dev, t, msi, drv = pci(mem)
    t.set_bar_address(0, 0xC000_0000)
    t.set_bar_address(2, 0xC001_0000)
    t.enable_decoding()
    enable_msix(t, 3)
    drv.set_status(1)
    drv.set_status(3)
    drv.write_driver_features(dev.avail_features)
    drv.set_status(11)
    from hvkit.devices.virtio.driver import DriverQueue
    for i in (0, 1):
        q = DriverQueue(mem, drv.alloc, i, 4)
        drv.queues[i] = q
        drv.program_queue(q, vector=i)
    drv.set_status(15)
    state = t.state()
    import json
    state = json.loads(json.dumps(state))          # snapshots are JSON-clean

    dev2 = Echo(mem)
    msi2 = RecordingMsi()
    t2 = VirtioPciTransport(dev2, msi2)
    moves = []
    t2.add_bar_listener(lambda i, old, new: moves.append((i, new)))
    t2.restore(state)
    assert (0, 0xC000_0000) in moves and (2, 0xC001_0000) in moves
    assert t2.msix.enabled and t2.queue_vector(1) == 1 and dev2.active
    drv2 = PciDriver(t2, mem)
    drv2.queues = drv.queues
    drv.queues[1].add([b"after"], [5])
    drv2.kick(1)
    assert drv.queues[1].wait(1)[0][2] == b"after"
    assert msi2.messages == [(0xFEE00000, 0x41)]


def test_mmio_transport_state_restore(mem):
    dev = Echo(mem)
    line = RecordingLine()
    t = VirtioMmioTransport(dev, line)
    drv = MmioDriver(t, mem)
    drv.setup()
    drv.queues[0].add([b"x"], [1])
    drv.kick(0)
    drv.queues[0].wait(1)
    state = t.state()
    line2 = RecordingLine()
    t2 = VirtioMmioTransport(Echo(mem), line2)
    t2.restore(state)
    assert line2.level and t2.interrupt_status == V.INT_VRING
    assert t2.device.queues[0].used_idx == 1


def test_mmio_edge_mode_pulses_every_interrupt(mem):
    dev = Echo(mem)
    line = RecordingLine()
    t = VirtioMmioTransport(dev, line, edge=True)
    drv = MmioDriver(t, mem)
    drv.setup(dev.avail_features & ~(1 << V.F_EVENT_IDX))
    for word in (b"a", b"b"):
        drv.queues[0].add([word], [1])
        drv.kick(0)
        drv.queues[0].wait(1)
    assert line.events == [True, False, True, False]   # no ack in between: still two
    assert drv.interrupt_status() == V.INT_VRING
    drv.ack(V.INT_VRING)
    assert line.events == [True, False, True, False]
