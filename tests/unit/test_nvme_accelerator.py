"""The accelerator process (modes b and c) without KVM.

Guest RAM is a memfd the test maps; the test plays the guest driver, rings
doorbells by MMIO (mode b) or through the shadow buffer and the ioeventfd's
eventfd (mode c), and checks completions, data and the interrupt eventfd.
"""
from __future__ import annotations

import os
import select
import signal
import struct

import pytest

from hvkit.devices.bus import Bus
from hvkit.devices.irq import RecordingMsi
from hvkit.devices.nvme import NvmeController
from hvkit.devices.nvme import spec as S
from hvkit.devices.nvme.driver import HostDriver, PageAllocator, eventfd_kicker
from hvkit.devices.pci import BarAllocator, PciBus
from hvkit.memory.guest import GuestMemory
from hvkit.storage.raw import RawFileBackend

MEM = 16 << 20
DISK = 4 << 20


class Rig:
    def __init__(self, tmp_path, doorbells: str) -> None:
        self.mem = GuestMemory.create(MEM)
        self.disk = RawFileBackend.create(tmp_path / "disk.img", DISK)
        self.disk2 = RawFileBackend.create(tmp_path / "disk2.img", DISK, block_size=4096)
        self.ctrl = NvmeController(self.mem, [self.disk, self.disk2], msi=RecordingMsi())
        self.acc = self.ctrl.use_accelerator(poll_us=2000)
        pci = PciBus()
        pci.add(self.ctrl)
        BarAllocator().assign(pci)
        self.mmio = Bus("mmio")
        for bar in self.ctrl.bars:
            if bar is not None:
                self.mmio.register(bar.mapped_at, bar.size, bar.region)
        self.drv = HostDriver(self.mem, self.mmio, self.ctrl.bars[0].mapped_at,
                              PageAllocator(1 << 20, MEM), doorbells=doorbells,
                              kick=eventfd_kicker(self.acc.kick_fd))
        # MSI-X on, vector 1 unmasked, for the I/O queue
        cap = self.ctrl.msix.cap_offset
        self.ctrl.config_write(cap + 2, struct.pack("<H", 0x8000))
        table = self.ctrl.bars[4].mapped_at
        for i, dword in enumerate((0xFEE00000, 0, 0x31, 0)):
            self.mmio.write(table + 16 + 4 * i, struct.pack("<I", dword))
        self.drv.enable()
        assert self.drv.create_io_queues(1, 64, vector=1).status == 0

    def close(self) -> None:
        self.ctrl.close()
        self.disk.close()
        self.disk2.close()
        self.mem.close()


@pytest.fixture(params=["mmio", "ioeventfd"])
def rig(request, tmp_path):
    r = Rig(tmp_path, request.param)
    if request.param != "mmio":
        assert r.drv.configure_dbbuf().status == 0
    yield r
    r.close()


def irq_count(fd: int, timeout: float = 2.0) -> int:
    if not select.select([fd], [], [], timeout)[0]:
        return 0
    return os.eventfd_read(fd)


def write_blocks(d: HostDriver, nsid: int, slba: int, payload: bytes, lba: int = 512) -> int:
    buf, p1, p2 = d.buffer(len(payload))
    d.mem.write(buf, payload)
    return d.submit(1, S.IO_WRITE, nsid=nsid, prp1=p1, prp2=p2, cdw10=slba,
                    cdw12=len(payload) // lba - 1)


def test_read_write_through_the_accelerator(rig):
    d = rig.drv
    payload = os.urandom(64 * 1024)
    cid = write_blocks(d, 1, 100, payload)
    (c,) = d.reap(1)
    assert (c.cid, c.status) == (cid, 0)
    assert irq_count(rig.acc.irq_fds[1]) >= 1             # the irqfd would fire
    rbuf, r1, r2 = d.buffer(len(payload))
    d.submit(1, S.IO_READ, nsid=1, prp1=r1, prp2=r2, cdw10=100, cdw12=127)
    assert d.reap(1)[0].status == 0
    assert d.mem.read(rbuf, len(payload)) == payload
    with open(rig.disk.path, "rb") as f:
        f.seek(100 * 512)
        assert f.read(len(payload)) == payload
    # several namespaces, errors come back as statuses from the other process
    d.submit(1, S.IO_READ, nsid=2, prp1=r1, prp2=r2, cdw10=DISK // 4096, cdw12=0)
    assert d.reap(1)[0].status == S.LBA_OUT_OF_RANGE
    d.submit(1, S.IO_READ, nsid=9, prp1=r1, cdw12=0)
    assert d.reap(1)[0].status == S.INVALID_NAMESPACE
    d.submit(1, S.IO_READ, nsid=1, prp1=MEM + 4096, cdw12=0)
    assert d.reap(1)[0].status == S.DATA_TRANSFER_ERROR
    smart, s1, _ = d.buffer(4096)
    assert d.admin(S.ADM_GET_LOG_PAGE, prp1=s1, cdw10=127 << 16 | S.LOG_SMART).status == 0
    assert int.from_bytes(d.mem.read(smart + 80, 16), "little") == 1        # host writes
    assert int.from_bytes(d.mem.read(smart + 64, 16), "little") == 1        # host reads


def test_queue_depth_and_batching(rig):
    d = rig.drv
    blocks = {}
    for i in range(48):
        data = bytes([i]) * 4096
        blocks[i] = data
        buf, p1, p2 = d.buffer(4096)
        d.mem.write(buf, data)
        old = d.queues[1].sq_tail
        d.submit(1, S.IO_WRITE, ring=False, nsid=1, prp1=p1, cdw10=8 * i, cdw12=7)
        if i % 8 == 7:
            d._ring(1, False, (old - 7) % 64, d.queues[1].sq_tail)
    done = d.reap(1, 48)
    assert sorted(c.cid for c in done) == list(range(48)) and all(c.status == 0 for c in done)
    with open(rig.disk.path, "rb") as f:
        for i, data in blocks.items():
            f.seek(8 * i * 512)
            assert f.read(4096) == data


def test_steady_state_needs_no_mmio_doorbells(tmp_path, monkeypatch):
    """Mode c: with shadow doorbells and EventIdx, a busy queue is served
    without any MMIO doorbell write (the VMM never sees it). The poller
    stops polling on a host with more runnable threads than CPUs (as a
    shared test machine often is), so this asks it to poll regardless."""
    monkeypatch.setenv("HVKIT_NVME_POLL", "always")
    r = Rig(tmp_path, "ioeventfd")
    try:
        d = r.drv
        assert d.configure_dbbuf().status == 0
        d.mmio_doorbells = 0
        kicks = []
        d.kick = lambda: (kicks.append(1), os.eventfd_write(r.acc.kick_fd, 1))
        buf, p1, _ = d.buffer(4096)
        for _ in range(200):
            d.submit(1, S.IO_READ, nsid=1, prp1=p1, cdw12=7)
            assert d.reap(1)[0].status == 0
        assert d.mmio_doorbells == 0              # nothing went through the VMM
        assert len(kicks) < 200                   # and the poller saved many ioeventfd signals
    finally:
        r.close()


def test_restart_keeps_acknowledged_writes(rig):
    d = rig.drv
    written = {}
    for i in range(60):
        data = os.urandom(4096)
        written[i] = data
        write_blocks(d, 1, 8 * i, data)
        if i == 20:
            first = d.reap(1, 5)
            os.kill(rig.acc.proc.pid, signal.SIGKILL)
            rig.acc.proc.wait()
    if d.doorbells != "mmio":
        rig.acc.restart()            # the machine would do this on the pidfd
    else:
        d.w32(S.DOORBELL_BASE + 8, d.queues[1].sq_tail)   # next doorbell restarts it
    rest = d.reap(1, 60 - len(first), timeout=20)
    cids = sorted(c.cid for c in first + rest)
    assert cids == list(range(60))                 # every command completed exactly once
    assert all(c.status == 0 for c in first + rest)
    assert rig.acc.restarts == 1 and rig.acc.alive()
    with open(rig.disk.path, "rb") as f:
        for i, data in written.items():
            f.seek(8 * i * 512)
            assert f.read(4096) == data
    # the new process serves new commands too
    write_blocks(d, 1, 4000, b"\x5a" * 512)
    assert d.reap(1)[0].status == 0


def test_queue_delete_and_reset_reach_the_accelerator(rig):
    d = rig.drv
    assert d.create_io_queues(2, 16, vector=1).status == 0
    assert rig.acc.stats()["sqs"] == [1, 2]
    assert d.admin(S.ADM_DELETE_SQ, cdw10=2).status == 0
    assert d.admin(S.ADM_DELETE_CQ, cdw10=2).status == 0
    assert rig.acc.stats()["sqs"] == [1]
    d.w32(S.REG_CC, 0)
    st = rig.acc.stats()
    assert st["sqs"] == [] and st["cqs"] == [] and not st["dbbuf"]
    d.disable()
    d.enable()
    assert d.create_io_queues(1, 16, vector=1).status == 0
    write_blocks(d, 1, 0, b"\x01" * 512)
    assert d.reap(1)[0].status == 0


def test_accelerator_refuses_unshareable_memory(tmp_path):
    from hvkit.errors import ConfigError
    mem = GuestMemory.create(1 << 20, backing="anonymous")
    disk = RawFileBackend.create(tmp_path / "x.img", 1 << 20)
    ctrl = NvmeController(mem, [disk])
    with pytest.raises(ConfigError):
        ctrl.use_accelerator()
    ctrl.close()
    disk.close()
    mem.close()


def test_intx_through_the_accelerator(tmp_path):
    """MSI-X off: the accelerator signals irq_fds[0]; the VMM, which then
    owns the level, asserts INTx until the guest consumes the entries."""
    from hvkit.devices.irq import RecordingLine
    mem = GuestMemory.create(MEM)
    disk = RawFileBackend.create(tmp_path / "d.img", DISK)
    ctrl = NvmeController(mem, [disk])
    try:
        acc = ctrl.use_accelerator(poll_us=1000)
        pci = PciBus()
        pci.add(ctrl)
        BarAllocator().assign(pci)
        mmio = Bus("mmio")
        for bar in ctrl.bars:
            if bar is not None:
                mmio.register(bar.mapped_at, bar.size, bar.region)
        line = RecordingLine()
        ctrl.attach_intx(line, 11)
        d = HostDriver(mem, mmio, ctrl.bars[0].mapped_at, PageAllocator(1 << 20, MEM))
        d.enable()
        assert d.create_io_queues(1, 16, vector=0).status == 0
        assert not line.level
        d.submit(1, S.IO_FLUSH, nsid=1)
        assert irq_count(acc.irq_fds[0]) >= 1
        ctrl.service_irq(0)                       # what the machine does with the eventfd
        assert line.level
        assert d.reap(1)[0].status == 0           # the reap writes the CQ head doorbell
        assert not line.level
    finally:
        ctrl.close()
        disk.close()
        mem.close()
