"""NVMe controller in-process (mode a): registers, admin and I/O commands."""
from __future__ import annotations

import os
import struct

import pytest

from hvkit.devices.bus import Bus
from hvkit.devices.irq import RecordingLine, RecordingMsi
from hvkit.devices.nvme import NvmeController
from hvkit.devices.nvme import spec as S
from hvkit.devices.nvme.driver import HostDriver, PageAllocator
from hvkit.devices.pci import BarAllocator, PciBus, PciHostBridge
from hvkit.memory.guest import GuestMemory
from hvkit.storage.raw import RawFileBackend

MEM = 16 << 20
NS1 = 1 << 20
NS2 = 2 << 20


class Rig:
    def __init__(self, tmp_path, **kw) -> None:
        self.mem = GuestMemory.create(MEM)
        self.disks = [RawFileBackend.create(tmp_path / "a.img", NS1),
                      RawFileBackend.create(tmp_path / "b.img", NS2, block_size=4096)]
        self.msi = RecordingMsi()
        self.ctrl = NvmeController(self.mem, self.disks, msi=self.msi, **kw)
        self.pci = PciBus()
        self.pci.add(PciHostBridge(), slot=0)
        self.pci.add(self.ctrl)
        BarAllocator().assign(self.pci)
        self.mmio = Bus("mmio")
        for bar in self.ctrl.bars:
            if bar is not None:
                self.mmio.register(bar.mapped_at, bar.size, bar.region)
        self.intx = RecordingLine()
        self.ctrl.attach_intx(self.intx, 10)
        self.drv = HostDriver(self.mem, self.mmio, self.ctrl.bars[0].mapped_at,
                              PageAllocator(1 << 20, MEM))

    def close(self) -> None:
        self.ctrl.close()
        for d in self.disks:
            d.close()
        self.mem.close()


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()


def test_registers_after_reset(rig):
    d = rig.drv
    cap = d.r64(S.REG_CAP)
    assert cap & 0xFFFF == 4095 and cap >> 16 & 1            # MQES, CQR
    assert cap >> 37 & 1 and (cap >> 32) & 0xF == 0            # NVM CSS, DSTRD 0
    assert d.r32(S.REG_VS) == 0x00010400
    assert d.r32(S.REG_CSTS) == 0
    d.w64(S.REG_CAP, 0)                                         # read-only
    assert d.r64(S.REG_CAP) == cap


def test_enable_disable_state_machine(rig):
    d = rig.drv
    d.enable()
    assert d.r32(S.REG_CSTS) & S.CSTS_RDY
    asq = d.r64(S.REG_ASQ)
    d.w64(S.REG_ASQ, 0x1234000)                 # ignored while enabled
    assert d.r64(S.REG_ASQ) == asq
    assert d.create_io_queues(1, 16).status == 0
    d.w32(S.REG_CC, 0)                           # controller reset
    assert d.r32(S.REG_CSTS) & S.CSTS_RDY == 0
    assert rig.ctrl.io_sqs == {} and rig.ctrl.io_cqs == {}
    assert d.r64(S.REG_ASQ) == asq              # admin registers survive reset
    # doorbells on a disabled controller touch nothing
    before = rig.mem.read(d.queues[0].cq_gpa, 4096)
    d.submit(0, S.ADM_IDENTIFY, cdw10=1)
    assert rig.mem.read(d.queues[0].cq_gpa, 4096) == before
    d.disable()
    d.enable()
    assert d.create_io_queues(1, 16).status == 0


def test_enable_refused_for_bad_config(rig):
    d = rig.drv
    d.w32(S.REG_AQA, 0)                          # one-entry admin queues
    d.w64(S.REG_ASQ, 0x10000)
    d.w64(S.REG_ACQ, 0x11000)
    d.w32(S.REG_CC, 1)
    assert d.r32(S.REG_CSTS) & S.CSTS_RDY == 0
    d.w32(S.REG_CC, 0)
    d.w32(S.REG_AQA, 0x0FFF0FFF)
    d.w64(S.REG_ACQ, MEM - 0x1000)               # 4096 entries run off the end of RAM
    d.w32(S.REG_CC, 1)
    assert d.r32(S.REG_CSTS) & S.CSTS_RDY == 0
    assert "outside guest RAM" in rig.ctrl.last_enable_error
    d.w32(S.REG_CC, 0)
    d.w32(S.REG_AQA, 0x001F001F)
    d.w64(S.REG_ACQ, 0x11000)
    d.w32(S.REG_CC, 1 | 1 << 7)                  # 8 KiB pages: unsupported
    assert d.r32(S.REG_CSTS) & S.CSTS_RDY == 0


def test_shutdown_notification(rig):
    d = rig.drv
    d.enable()
    d.w32(S.REG_CC, d.r32(S.REG_CC) | 1 << S.CC_SHN_SHIFT)
    assert (d.r32(S.REG_CSTS) >> 2) & 3 == S.SHST_COMPLETE


def test_identify_controller_and_namespaces(rig):
    d = rig.drv
    d.enable()
    c, data = d.identify(S.CNS_CONTROLLER)
    assert c.status == 0
    assert data[4:24].rstrip() == b"HVKIT0001"
    assert struct.unpack_from("<H", data, 0x100)[0] & S.OACS_DBBUF
    assert struct.unpack_from("<I", data, 0x204)[0] == 2                  # NN
    assert data[0x200] == 0x66 and data[0x201] == 0x44
    oncs = struct.unpack_from("<H", data, 0x208)[0]
    assert oncs & S.ONCS_DSM and oncs & S.ONCS_WRITE_ZEROES
    c, data = d.identify(S.CNS_NAMESPACE, nsid=1)
    assert c.status == 0 and struct.unpack_from("<Q", data, 0)[0] == NS1 // 512
    assert data[0x80 + 2] == 9
    c, data = d.identify(S.CNS_NAMESPACE, nsid=2)
    assert struct.unpack_from("<Q", data, 0)[0] == NS2 // 4096 and data[0x82] == 12
    c, data = d.identify(S.CNS_ACTIVE_NS_LIST, nsid=0)
    assert struct.unpack_from("<3I", data, 0) == (1, 2, 0)
    c, data = d.identify(S.CNS_ACTIVE_NS_LIST, nsid=1)
    assert struct.unpack_from("<2I", data, 0) == (2, 0)
    c, data = d.identify(S.CNS_NS_DESCRIPTORS, nsid=1)
    assert c.status == 0 and data[0] == 1 and data[1] == 8
    assert d.identify(S.CNS_NAMESPACE, nsid=0)[0].status == S.INVALID_NAMESPACE
    assert d.identify(S.CNS_NAMESPACE, nsid=7)[0].status == S.INVALID_NAMESPACE
    assert d.identify(0x55)[0].status == S.INVALID_FIELD


def test_queue_creation_errors(rig):
    d = rig.drv
    d.enable()
    page = d.alloc.pages(1)
    A = S.ADM_CREATE_CQ
    assert d.admin(A, prp1=page, cdw10=15 << 16 | 0, cdw11=3).status == S.INVALID_QUEUE_ID
    assert d.admin(A, prp1=page, cdw10=15 << 16 | 17, cdw11=3).status == S.INVALID_QUEUE_ID
    assert d.admin(A, prp1=page, cdw10=0 << 16 | 1, cdw11=3).status == S.INVALID_QUEUE_SIZE
    assert d.admin(A, prp1=page, cdw10=4096 << 16 | 1, cdw11=3).status == S.INVALID_QUEUE_SIZE
    assert d.admin(A, prp1=page, cdw10=15 << 16 | 1, cdw11=5 << 16 | 3).status == S.INVALID_INTERRUPT_VECTOR
    assert d.admin(A, prp1=page, cdw10=15 << 16 | 1, cdw11=2).status == S.INVALID_FIELD   # not contiguous
    assert d.admin(A, prp1=page + 8, cdw10=15 << 16 | 1, cdw11=3).status == S.PRP_OFFSET_INVALID
    assert d.admin(A, prp1=MEM, cdw10=15 << 16 | 1, cdw11=3).status == S.INVALID_FIELD
    assert d.admin(S.ADM_CREATE_SQ, prp1=page, cdw10=15 << 16 | 1, cdw11=1 << 16 | 1).status == S.CQ_INVALID
    assert d.admin(A, prp1=page, cdw10=15 << 16 | 1, cdw11=3).status == 0
    assert d.admin(A, prp1=page, cdw10=15 << 16 | 1, cdw11=3).status == S.INVALID_QUEUE_ID
    sq = d.alloc.pages(1)
    assert d.admin(S.ADM_CREATE_SQ, prp1=sq, cdw10=15 << 16 | 1, cdw11=1 << 16 | 1).status == 0
    assert d.admin(S.ADM_DELETE_CQ, cdw10=1).status == S.INVALID_QUEUE_DELETION
    assert d.admin(S.ADM_DELETE_SQ, cdw10=2).status == S.INVALID_QUEUE_ID
    assert d.admin(S.ADM_DELETE_SQ, cdw10=0).status == S.INVALID_QUEUE_ID
    assert d.admin(S.ADM_DELETE_SQ, cdw10=1).status == 0
    assert d.admin(S.ADM_DELETE_CQ, cdw10=1).status == 0
    c = d.admin(0x77)
    assert c.status == S.INVALID_OPCODE and c.dnr


def test_features(rig):
    d = rig.drv
    d.enable()
    c = d.admin(S.ADM_SET_FEATURES, cdw10=S.FEAT_NUM_QUEUES, cdw11=3 << 16 | 3)
    assert c.status == 0 and c.dw0 == 3 << 16 | 3
    assert d.admin(S.ADM_GET_FEATURES, cdw10=S.FEAT_NUM_QUEUES).dw0 == 3 << 16 | 3
    assert d.admin(S.ADM_GET_FEATURES, cdw10=1 << 8 | S.FEAT_NUM_QUEUES).dw0 == 15 << 16 | 15
    c = d.admin(S.ADM_SET_FEATURES, cdw10=S.FEAT_NUM_QUEUES, cdw11=100 << 16 | 100)
    assert c.dw0 == 15 << 16 | 15                               # capped at what we have
    assert d.admin(S.ADM_SET_FEATURES, cdw10=S.FEAT_NUM_QUEUES, cdw11=0xFFFF).status == S.INVALID_FIELD
    assert d.create_io_queues(1, 8).status == 0
    c = d.admin(S.ADM_SET_FEATURES, cdw10=S.FEAT_NUM_QUEUES, cdw11=0)
    assert c.status == S.COMMAND_SEQUENCE_ERROR
    assert d.admin(S.ADM_SET_FEATURES, cdw10=S.FEAT_IRQ_COALESCING, cdw11=0x0A04).status == 0
    assert d.admin(S.ADM_GET_FEATURES, cdw10=S.FEAT_IRQ_COALESCING).dw0 == 0x0A04
    assert rig.ctrl.engine.coalesce_threshold == 4
    assert d.admin(S.ADM_GET_FEATURES, cdw10=3 << 8 | S.FEAT_IRQ_COALESCING).dw0 == 0b100
    c = d.admin(S.ADM_SET_FEATURES, cdw10=1 << 31 | S.FEAT_IRQ_COALESCING, cdw11=1)
    assert c.status == S.FEATURE_NOT_SAVEABLE
    assert d.admin(S.ADM_GET_FEATURES, cdw10=0x55).status == S.INVALID_FIELD
    assert d.admin(S.ADM_GET_FEATURES, cdw10=S.FEAT_VOLATILE_WC).dw0 == 1
    assert d.admin(S.ADM_GET_FEATURES, cdw10=S.FEAT_IRQ_CONFIG, cdw11=99).status == S.INVALID_FIELD


def test_log_pages(rig):
    d = rig.drv
    d.enable()
    buf, p1, p2 = d.buffer(4096)
    numd = S.SMART_LOG_SIZE // 4 - 1
    c = d.admin(S.ADM_GET_LOG_PAGE, nsid=0xFFFFFFFF, prp1=p1, prp2=p2,
                cdw10=numd << 16 | S.LOG_SMART)
    assert c.status == 0
    smart = d.mem.read(buf, 512)
    assert struct.unpack_from("<H", smart, 1)[0] > 273 and smart[3] == 100
    rig.mem.fill(buf, 4096, 0xEE)
    c = d.admin(S.ADM_GET_LOG_PAGE, prp1=p1, prp2=p2, cdw10=(16 * 64 // 4 - 1) << 16 | S.LOG_ERROR)
    assert c.status == 0 and d.mem.read(buf, 1024) == bytes(1024)     # no errors yet
    assert d.mem.read(buf + 1024, 4) == b"\xee" * 4                     # exact size
    assert d.admin(S.ADM_GET_LOG_PAGE, prp1=p1, cdw10=0x7F << 16 | 0x42).status == S.INVALID_LOG_PAGE
    c = d.admin(S.ADM_GET_LOG_PAGE, prp1=p1, cdw10=0x7F << 16 | S.LOG_SMART, cdw12=512)
    assert c.status == S.INVALID_FIELD                                   # offset past the end
    d.admin(0x77)                                                        # an error to log
    d.admin(S.ADM_GET_LOG_PAGE, prp1=p1, prp2=p2, cdw10=15 << 16 | S.LOG_ERROR)
    count, sqid, cid = struct.unpack_from("<QHH", d.mem.read(buf, 12))
    assert count >= 1 and sqid == 0


def test_read_write_flush_zeroes_dsm(rig):
    d = rig.drv
    d.enable()
    assert d.create_io_queues(1, 64).status == 0
    for nsid, lba, nbytes in ((1, 512, 3 * 4096 + 1024), (2, 4096, 32 * 4096)):
        payload = os.urandom(nbytes)
        buf, p1, p2 = d.buffer(nbytes)
        d.mem.write(buf, payload)
        cid = d.submit(1, S.IO_WRITE, nsid=nsid, prp1=p1, prp2=p2, cdw10=7, cdw12=nbytes // lba - 1)
        (c,) = d.reap(1)
        assert (c.cid, c.status, c.sqid) == (cid, 0, 1)
        rbuf, r1, r2 = d.buffer(nbytes)
        d.submit(1, S.IO_READ, nsid=nsid, prp1=r1, prp2=r2, cdw10=7, cdw12=nbytes // lba - 1)
        assert d.reap(1)[0].status == 0
        assert d.mem.read(rbuf, nbytes) == payload
        with open(rig.disks[nsid - 1].path, "rb") as f:
            f.seek(7 * lba)
            assert f.read(nbytes) == payload
    d.submit(1, S.IO_FLUSH, nsid=0xFFFFFFFF)
    assert d.reap(1)[0].status == 0
    d.submit(1, S.IO_WRITE_ZEROES, nsid=1, cdw10=8, cdw12=1)
    assert d.reap(1)[0].status == 0
    rbuf, r1, r2 = d.buffer(4096)
    d.submit(1, S.IO_READ, nsid=1, prp1=r1, prp2=r2, cdw10=7, cdw12=3)
    d.reap(1)
    block = d.mem.read(rbuf, 2048)
    assert block[:512] != bytes(512) and block[512:1536] == bytes(1024) and block[1536:] != bytes(512)
    ranges, q1, _ = d.buffer(4096)
    d.mem.write(ranges, struct.pack("<IIQ", 0, 8, 0) + struct.pack("<IIQ", 0, 0, 1 << 40))
    d.submit(1, S.IO_DSM, nsid=1, prp1=q1, cdw10=1, cdw11=S.DSM_ATTR_DEALLOCATE)
    assert d.reap(1)[0].status == 0
    d.mem.write(ranges, struct.pack("<IIQ", 0, 8, NS1 // 512 - 4))
    d.submit(1, S.IO_DSM, nsid=1, prp1=q1, cdw10=0, cdw11=S.DSM_ATTR_DEALLOCATE)
    assert d.reap(1)[0].status == S.LBA_OUT_OF_RANGE
    smart_buf, s1, s2 = d.buffer(4096)
    d.admin(S.ADM_GET_LOG_PAGE, prp1=s1, cdw10=127 << 16 | S.LOG_SMART)
    assert int.from_bytes(d.mem.read(smart_buf + 80, 16), "little") == 2     # host writes


def test_io_errors(rig):
    d = rig.drv
    d.enable()
    d.create_io_queues(1, 16)
    buf, p1, p2 = d.buffer(8192)
    cases = [
        (dict(nsid=3, prp1=p1, cdw12=0), S.INVALID_NAMESPACE),
        (dict(nsid=1, prp1=p1, cdw10=NS1 // 512, cdw12=0), S.LBA_OUT_OF_RANGE),
        (dict(nsid=1, prp1=p1, cdw10=0xFFFFFFFF, cdw11=0xFFFFFFFF, cdw12=0), S.LBA_OUT_OF_RANGE),
        (dict(nsid=1, prp1=p1, cdw12=0xFFFF), S.LBA_OUT_OF_RANGE),
        (dict(nsid=1, prp1=p1, cdw12=511), S.INVALID_FIELD),                   # > MDTS (128 KiB)
        (dict(nsid=1, prp1=MEM, cdw12=0), S.DATA_TRANSFER_ERROR),
        (dict(nsid=1, prp1=p1 + 2, cdw12=0), S.PRP_OFFSET_INVALID),
        (dict(nsid=1, prp1=p1, prp2=p2 + 512, cdw12=15), S.PRP_OFFSET_INVALID),
        (dict(nsid=1, prp1=p1, prp2=MEM + 4096, cdw12=15), S.DATA_TRANSFER_ERROR),
        (dict(nsid=1, prp1=p1, prp2=MEM, cdw12=31), S.DATA_TRANSFER_ERROR),       # list off the end
        (dict(nsid=1, prp1=p1, cdw12=0, flags=1 << 6), S.INVALID_FIELD),          # SGL
    ]
    for fields, status in cases:
        d.submit(1, S.IO_READ, **fields)
        c = d.reap(1)[0]
        assert c.status == status, fields
        assert c.dnr
    d.submit(1, 0x7E, nsid=1)
    assert d.reap(1)[0].status == S.INVALID_OPCODE


def test_prp_list_chaining(rig):
    """A PRP list whose first page is offset so it must chain to a second."""
    d = rig.drv
    d.enable()
    d.create_io_queues(1, 16)
    nbytes = 32 * 4096                       # 31 list entries after PRP1
    data = d.alloc.pages(32)
    payload = os.urandom(nbytes)
    d.mem.write(data, payload)
    l1 = d.alloc.pages(1)
    l2 = d.alloc.pages(1)
    start = l1 + 4096 - 8 * 10               # room for 10 entries: 9 data + 1 chain
    for i in range(9):
        d.mem.write_u64(start + 8 * i, data + (i + 1) * 4096)
    d.mem.write_u64(start + 8 * 9, l2)
    for i in range(9, 31):
        d.mem.write_u64(l2 + 8 * (i - 9), data + (i + 1) * 4096)
    d.submit(1, S.IO_WRITE, nsid=1, prp1=data, prp2=start, cdw12=nbytes // 512 - 1)
    assert d.reap(1)[0].status == 0
    with open(rig.disks[0].path, "rb") as f:
        assert f.read(nbytes) == payload
    d.mem.write_u64(start + 8 * 9, l1)       # a list that chains to itself
    d.submit(1, S.IO_WRITE, nsid=1, prp1=data, prp2=l1 + 4096 - 8, cdw12=nbytes // 512 - 1)
    assert d.reap(1)[0].status in (S.INVALID_FIELD, S.PRP_OFFSET_INVALID)


def test_msix_interrupts_and_intx(rig):
    d = rig.drv
    d.enable()
    # INTx while MSI-X is off: asserted by a completion, dropped once consumed
    d.submit(0, S.ADM_GET_FEATURES, cdw10=S.FEAT_VOLATILE_WC)
    assert rig.intx.level
    d.reap(0)
    assert not rig.intx.level
    d.w32(S.REG_INTMS, 1)
    d.submit(0, S.ADM_GET_FEATURES, cdw10=S.FEAT_VOLATILE_WC)
    assert not rig.intx.level                # masked by INTMS
    d.w32(S.REG_INTMC, 1)
    assert rig.intx.level
    d.reap(0)
    # MSI-X: enable, program vector 2, I/O CQ on vector 2
    cap = rig.ctrl.msix.cap_offset
    rig.ctrl.config_write(cap + 2, struct.pack("<H", 0x8000))
    table = rig.ctrl.bars[4].mapped_at
    for i, dword in enumerate((0xFEE00000, 0, 0x4242, 0)):
        rig.mmio.write(table + 32 + 4 * i, struct.pack("<I", dword))
    assert d.create_io_queues(1, 8, vector=2).status == 0
    rig.msi.messages.clear()
    d.submit(1, S.IO_FLUSH, nsid=1)
    assert rig.msi.messages == [(0xFEE00000, 0x4242)]
    d.reap(1)


def test_async_events_for_bad_doorbells(rig):
    d = rig.drv
    d.enable()
    cids = [d.submit(0, S.ADM_ASYNC_EVENT) for _ in range(4)]
    d.submit(0, S.ADM_ASYNC_EVENT)
    (over,) = d.reap(0)
    assert over.status == S.AER_LIMIT_EXCEEDED
    d.w32(S.DOORBELL_BASE + 8 * 5, 1)                  # SQ 5 does not exist
    (ev,) = d.reap(0)
    assert ev.cid in cids and ev.status == 0
    assert ev.dw0 & 7 == S.AER_TYPE_ERROR and (ev.dw0 >> 8) & 0xFF == S.AER_INFO_INVALID_DB_REGISTER
    assert (ev.dw0 >> 16) & 0xFF == S.LOG_ERROR
    d.w32(S.DOORBELL_BASE, 999)                        # past the admin SQ's end
    assert d._poll_cq(d.queues[0]) == []               # masked until the log is read
    buf, p1, _ = d.buffer(4096)
    d.admin(S.ADM_GET_LOG_PAGE, prp1=p1, cdw10=15 << 16 | S.LOG_ERROR)
    (ev2,) = d.other_admin
    assert (ev2.dw0 >> 8) & 0xFF == S.AER_INFO_INVALID_DB_VALUE
    assert d.admin(S.ADM_ABORT, cdw10=5 << 16 | 0).dw0 & 1 == 1


def test_shadow_doorbells_in_process(rig):
    d = rig.drv
    d.wanted_doorbells = "shadow"
    d.enable()
    rig.ctrl.config_write(rig.ctrl.msix.cap_offset + 2, struct.pack("<H", 0x8000))   # MSI-X on
    d.create_io_queues(1, 32)
    assert d.configure_dbbuf().status == 0
    buf, p1, p2 = d.buffer(4096)
    d.mmio_doorbells = 0
    for _ in range(20):
        d.submit(1, S.IO_READ, nsid=1, prp1=p1, cdw12=0)
        assert d.reap(1)[0].status == 0
    # in-process there is no poller, so EventIdx asks for every SQ doorbell,
    # and CQ head updates need no MMIO write at all
    assert d.mmio_doorbells == 20
    assert d.admin(S.ADM_DBBUF_CONFIG, prp1=p1 + 8, prp2=p2).status == S.INVALID_FIELD
    assert d.admin(S.ADM_DBBUF_CONFIG, prp1=MEM, prp2=p1).status == S.INVALID_FIELD


def test_shadow_doorbells_need_msix(rig):
    """With pin interrupts the controller must see each CQ head update to
    drop INTx, and a shadow CQ head is written without an MMIO write (Linux
    with pci=nomsi would take an endless level interrupt): the Doorbell
    Buffer Config is refused while MSI-X is off, the queues keep working on
    MMIO doorbells, and INTx drops once the host consumed the entries."""
    d = rig.drv
    d.enable()
    assert d.create_io_queues(1, 8, vector=0).status == 0
    c = d.configure_dbbuf()
    assert c.status == S.COMMAND_SEQUENCE_ERROR
    assert rig.ctrl.dbbuf is None
    buf, p1, _ = d.buffer(4096)
    d.submit(1, S.IO_READ, nsid=1, prp1=p1, cdw12=7)
    assert rig.intx.level
    assert d.reap(1)[0].status == 0
    assert not rig.intx.level


def test_need_event_rule():
    assert S.need_event(5, 6, 5)          # device waits at 5: ring
    assert not S.need_event(3, 6, 5)      # device has not caught up to 5: skip
    assert S.need_event(0xFFFF, 1, 0xFFFE)  # across the 16-bit wrap


def test_interrupt_coalescing(rig):
    """One doorbell, eight completions: one interrupt at the end of the pass
    without coalescing; with an aggregation threshold of 4 entries, one per
    four (the end of the pass stands in for the aggregation time)."""
    d = rig.drv
    d.enable()
    cap = rig.ctrl.msix.cap_offset
    rig.ctrl.config_write(cap + 2, struct.pack("<H", 0x8000))
    table = rig.ctrl.bars[4].mapped_at
    for i, dword in enumerate((0xFEE00000, 0, 0x51, 0)):
        rig.mmio.write(table + 16 + 4 * i, struct.pack("<I", dword))
    assert d.create_io_queues(1, 32, vector=1).status == 0

    def burst() -> int:
        rig.msi.messages.clear()
        old = d.queues[1].sq_tail
        for _ in range(8):
            d.submit(1, S.IO_FLUSH, ring=False, nsid=1)
        d.ring_sq(1, old)
        assert len(d.reap(1, 8)) == 8
        return len(rig.msi.messages)

    assert burst() == 1
    assert d.admin(S.ADM_SET_FEATURES, cdw10=S.FEAT_IRQ_COALESCING, cdw11=3).status == 0
    assert burst() == 2
    # Interrupt Vector Configuration: coalescing disabled for vector 1
    assert d.admin(S.ADM_SET_FEATURES, cdw10=S.FEAT_IRQ_CONFIG, cdw11=1 << 16 | 1).status == 0
    assert burst() == 1


def test_bar_move_moves_the_doorbells(rig):
    """The machine hears the move and finds the doorbells at the new place
    (what it re-registers ioeventfds on)."""
    moves = []
    rig.pci.add_bar_listener(lambda dev, i, old, new: moves.append((i, old, new)))
    old_base = rig.ctrl.bars[0].mapped_at
    msix_base = rig.ctrl.bars[4].mapped_at
    assert rig.ctrl.doorbell_address(1, False) == old_base + 0x1008
    cmd = rig.ctrl.config.get_u16(0x04)
    rig.ctrl.config_write(0x04, struct.pack("<H", cmd & ~0x2))
    assert rig.ctrl.doorbell_address(1, False) is None
    assert rig.ctrl.ioeventfd_doorbells() == []
    rig.ctrl.config_write(0x10, struct.pack("<I", 0xE000_0000))
    rig.ctrl.config_write(0x14, struct.pack("<I", 0))
    rig.ctrl.config_write(0x04, struct.pack("<H", cmd))
    assert moves == [(0, old_base, None), (4, msix_base, None),
                     (0, None, 0xE000_0000), (4, None, msix_base)]
    assert rig.ctrl.doorbell_address(1, True) == 0xE000_100C
    addrs = rig.ctrl.ioeventfd_doorbells()
    assert addrs[0] == (0xE000_1008, 4) and len(addrs) == 2 * 16


def test_identify_controller_asks_for_no_host_memory_buffer():
    """WCTEMP/CCTEMP sit at bytes 266-269; a shifted write once landed in
    HMPRE and made Linux try to give the controller a host memory buffer."""
    import struct as _s

    from hvkit.devices.nvme.controller import NvmeController
    from hvkit.memory.guest import GuestMemory
    from hvkit.storage.raw import RawFileBackend
    import tempfile, os
    d = tempfile.mkdtemp()
    be = RawFileBackend.create(os.path.join(d, "d.img"), 1 << 20)
    with GuestMemory.create(1 << 20) as mem:
        ident = NvmeController(mem, [be]).identify_controller()
    be.close()
    wctemp, cctemp, mtfa, hmpre, hmmin = _s.unpack_from("<HHHII", ident, 266)
    assert (wctemp, cctemp) == (343, 358)
    assert hmpre == 0 and hmmin == 0
