"""Split virtqueues: chains, indirect tables, EVENT_IDX and hostile rings."""
from __future__ import annotations

import struct

import pytest

from hvkit.devices.virtio import spec as V
from hvkit.devices.virtio.chain import ChainError, QueueBroken
from hvkit.devices.virtio.driver import Allocator, DriverQueue
from hvkit.devices.virtio.queue import MAX_INDIRECT, Virtqueue
from hvkit.memory.guest import GuestMemory, MemoryRegion

MEM = 1 << 20


@pytest.fixture
def mem():
    m = GuestMemory.create(MEM)
    yield m
    m.close()


def make(mem, size=8, event_idx=False, indirect=True):
    alloc = Allocator(0x1000, MEM)
    dq = DriverQueue(mem, alloc, 0, size)
    vq = Virtqueue(mem, 0, size)
    vq.size = size
    vq.desc_addr, vq.driver_addr, vq.device_addr = dq.desc, dq.avail, dq.used
    vq.event_idx = event_idx
    vq.indirect = indirect
    vq.enable()
    return dq, vq


def test_need_event_arithmetic_wraps():
    assert V.vring_need_event(0, 1, 0)
    assert not V.vring_need_event(1, 1, 0)
    assert V.vring_need_event(0xFFFF, 0, 0xFFFF)            # wrap: 0xffff -> 0 passes 0xffff
    assert V.vring_need_event(0xFFFE, 2, 0xFFFD)
    assert not V.vring_need_event(5, 2, 0xFFFD)
    assert not V.vring_need_event(7, 7, 7)                   # nothing moved


def test_direct_chain_round_trip(mem):
    dq, vq = make(mem)
    head = dq.add([b"hello ", b"world"], [4, 3])
    chain = vq.pop()
    assert chain.head == head and chain.read_len == 11 and chain.write_len == 7
    assert chain.reader().read(11) == b"hello world"
    w = chain.writer()
    w.write(b"abcdefg")
    with pytest.raises(ChainError):
        w.write(b"x")                                         # no room left: never past the buffers
    vq.push(chain.head, w.done)
    assert vq.pop() is None
    [(h, n, data)] = dq.wait(1)
    assert (h, n, data) == (head, 7, b"abcdefg")


def test_reader_views_are_guest_memory_not_copies(mem):
    dq, vq = make(mem)
    dq.add([b"x" * 64])
    chain = vq.pop()
    view = chain.reader().take(64)[0]
    assert isinstance(view, memoryview)
    addr = dq.inflight[chain.head][0]
    desc_addr = struct.unpack_from("<Q", mem.read(dq.desc + 16 * addr[0], 8))[0]
    mem.write(desc_addr, b"y")
    assert bytes(view[:1]) == b"y"


def test_indirect_chain(mem):
    dq, vq = make(mem)
    head = dq.add([b"hdr", b"body"], [16], indirect=True)
    chain = vq.pop()
    assert chain.head == head
    assert chain.reader().read(7) == b"hdrbody"
    assert chain.write_len == 16


def test_indirect_refused_without_feature(mem):
    dq, vq = make(mem, indirect=False)
    head = dq.add([b"x"], indirect=True)
    with pytest.raises(ChainError) as e:
        vq.pop()
    assert e.value.head == head


def test_loop_is_refused(mem):
    dq, vq = make(mem)
    buf = dq.alloc.alloc(16)
    dq.raw_descriptor(0, buf, 16, V.DESC_F_NEXT, 1)
    dq.raw_descriptor(1, buf, 16, V.DESC_F_NEXT, 0)
    dq.publish(0)
    with pytest.raises(ChainError, match="loops"):
        vq.pop()
    assert vq.pop() is None                              # consumed, the queue goes on


def test_self_loop_in_indirect_table(mem):
    dq, vq = make(mem)
    table = dq.alloc.alloc(32)
    buf = dq.alloc.alloc(16)
    dq.raw_descriptor(0, buf, 16, V.DESC_F_NEXT, 1, table=table)
    dq.raw_descriptor(1, buf, 16, V.DESC_F_NEXT, 0, table=table)
    dq.raw_descriptor(0, table, 32, V.DESC_F_INDIRECT, 0)
    dq.publish(0)
    with pytest.raises(ChainError, match="loops"):
        vq.pop()


@pytest.mark.parametrize("flags,length,why", [
    (V.DESC_F_INDIRECT | V.DESC_F_NEXT, 32, "NEXT"),
    (V.DESC_F_INDIRECT, 0, "indirect table"),
    (V.DESC_F_INDIRECT, 24, "indirect table"),
    (V.DESC_F_INDIRECT, 16 * (MAX_INDIRECT + 1), "indirect table"),
])
def test_bad_indirect_descriptors(mem, flags, length, why):
    dq, vq = make(mem)
    table = dq.alloc.alloc(16 * (MAX_INDIRECT + 1))
    dq.raw_descriptor(0, dq.alloc.alloc(8), 8, 0, 0, table=table)
    dq.raw_descriptor(0, table, length, flags, 1)
    dq.publish(0)
    with pytest.raises(ChainError, match=why):
        vq.pop()


def test_nested_indirect_refused(mem):
    dq, vq = make(mem)
    inner = dq.alloc.alloc(16)
    outer = dq.alloc.alloc(16)
    dq.raw_descriptor(0, dq.alloc.alloc(8), 8, 0, 0, table=inner)
    dq.raw_descriptor(0, inner, 16, V.DESC_F_INDIRECT, 0, table=outer)
    dq.raw_descriptor(0, outer, 16, V.DESC_F_INDIRECT, 0)
    dq.publish(0)
    with pytest.raises(ChainError, match="nested"):
        vq.pop()


def test_indirect_table_outside_ram(mem):
    dq, vq = make(mem)
    dq.raw_descriptor(0, MEM - 16, 32, V.DESC_F_INDIRECT, 0)
    dq.publish(0)
    with pytest.raises(ChainError, match="outside guest RAM"):
        vq.pop()


@pytest.mark.parametrize("addr,length", [(MEM - 4, 8), (MEM, 1), (2 ** 64 - 4, 8),
                                         (0xFFFF_FFFF_0000, 0xFFFF_FFFF)])
def test_buffer_outside_ram(mem, addr, length):
    dq, vq = make(mem)
    dq.raw_descriptor(0, addr, length, V.DESC_F_WRITE, 0)
    dq.publish(0)
    with pytest.raises(ChainError, match="outside guest RAM"):
        vq.pop()


def test_next_index_outside_table(mem):
    dq, vq = make(mem)
    dq.raw_descriptor(0, dq.alloc.alloc(8), 8, V.DESC_F_NEXT, 8)
    dq.publish(0)
    with pytest.raises(ChainError, match="outside"):
        vq.pop()


def test_readable_after_writable_refused(mem):
    dq, vq = make(mem)
    a = dq.alloc.alloc(8)
    dq.raw_descriptor(0, a, 8, V.DESC_F_WRITE | V.DESC_F_NEXT, 1)
    dq.raw_descriptor(1, a, 8, 0, 0)
    dq.publish(0)
    with pytest.raises(ChainError, match="readable"):
        vq.pop()


def test_zero_length_descriptor_is_skipped_without_address_check(mem):
    dq, vq = make(mem)
    dq.raw_descriptor(0, 2 ** 64 - 1, 0, V.DESC_F_NEXT, 1)
    dq.raw_descriptor(1, dq.alloc.alloc(4), 4, V.DESC_F_WRITE, 0)
    dq.publish(0)
    chain = vq.pop()
    assert chain.read_len == 0 and chain.write_len == 4


def test_avail_index_jump_breaks_the_queue(mem):
    dq, vq = make(mem)
    dq.set_avail_idx(9)                                     # 9 > size 8
    with pytest.raises(QueueBroken):
        vq.pop()
    assert vq.broken and vq.pop() is None and not vq.has_work()


def test_head_index_outside_queue_breaks_it(mem):
    dq, vq = make(mem)
    mem.write_u16(dq.avail + 4, 8)
    dq.set_avail_idx(1)
    with pytest.raises(QueueBroken):
        vq.pop()


def test_rings_outside_ram_or_misaligned_refused(mem):
    vq = Virtqueue(mem, 0, 8)
    vq.desc_addr, vq.driver_addr, vq.device_addr = MEM - 64, 0x2000, 0x3000
    with pytest.raises(QueueBroken):
        vq.enable()
    vq.desc_addr = 0x1008
    with pytest.raises(QueueBroken, match="misaligned"):
        vq.enable()
    vq.desc_addr, vq.size = 0x1000, 6
    with pytest.raises(QueueBroken, match="power of two"):
        vq.enable()
    vq.size = 16
    with pytest.raises(QueueBroken):
        vq.enable()
    assert not vq.ready


def test_chain_longer_than_queue(mem):
    dq, vq = make(mem, size=4)
    a = dq.alloc.alloc(8)
    for i in range(4):
        dq.raw_descriptor(i, a, 8, V.DESC_F_NEXT, (i + 1) % 4)
    dq.publish(0)
    with pytest.raises(ChainError):
        vq.pop()


def test_buffer_spanning_two_regions():
    mem = GuestMemory([MemoryRegion(0, 0x10000, name="lo"),
                       MemoryRegion(0x10000, 0x10000, name="hi")])
    try:
        alloc = Allocator(0x1000, 0x8000)
        dq = DriverQueue(mem, alloc, 0, 4)
        vq = Virtqueue(mem, 0, 4)
        vq.desc_addr, vq.driver_addr, vq.device_addr = dq.desc, dq.avail, dq.used
        vq.enable()
        mem.write(0xFFF0, b"A" * 16 + b"B" * 16)
        dq.raw_descriptor(0, 0xFFF0, 32, 0, 0)
        dq.publish(0)
        chain = vq.pop()
        assert len(chain.readable) == 2
        assert chain.reader().read(32) == b"A" * 16 + b"B" * 16
    finally:
        mem.close()


def test_no_interrupt_flag_without_event_idx(mem):
    dq, vq = make(mem)
    dq.add([b"a"])
    vq.push(vq.pop().head, 0)
    assert vq.needs_interrupt()
    assert not vq.needs_interrupt()                       # nothing new
    dq.set_no_interrupt(True)
    dq.add([b"b"])
    vq.push(vq.pop().head, 0)
    assert not vq.needs_interrupt()


def test_event_idx_used_event_and_avail_event(mem):
    dq, vq = make(mem, size=8, event_idx=True)
    for _ in range(3):
        dq.add([b"a"])
    dq.set_used_event(1)              # interrupt once used idx passes 1
    vq.push(vq.pop().head, 0)         # used idx 1: not past 1
    assert not vq.needs_interrupt()
    vq.push(vq.pop().head, 0)         # used idx 2: passed
    assert vq.needs_interrupt()
    vq.push(vq.pop().head, 0)
    assert not vq.needs_interrupt()   # already signalled past 1
    # the device publishes avail_event = last_avail when it re-arms
    assert not vq.enable_notification()
    assert dq.avail_event() == 3
    vq.disable_notification()
    assert dq.used_flags() == 0       # EVENT_IDX: the flag is not used


def test_event_idx_wraps_at_16_bits(mem):
    dq, vq = make(mem, size=8, event_idx=True)
    vq.last_avail = vq.used_idx = vq._signalled = 0xFFFE
    dq.avail_idx = dq.last_used = 0xFFFE
    dq.set_avail_idx(0xFFFE)
    mem.write_u16(dq.used + 2, 0xFFFE)
    dq.set_used_event(0xFFFF)
    for _ in range(3):
        dq.add([b"a"])
    assert vq.pending() == 3
    for _ in range(3):
        vq.push(vq.pop().head, 0)
    assert vq.used_idx == 1
    assert vq.needs_interrupt()       # 0xfffe -> 1 passed 0xffff
    assert len(dq.wait(3)) == 3


def test_enable_notification_reports_late_work(mem):
    dq, vq = make(mem)
    vq.disable_notification()
    assert dq.used_flags() == V.USED_F_NO_NOTIFY
    dq.add([b"a"])
    assert vq.enable_notification()  # work arrived: the caller must not sleep
    assert dq.used_flags() == 0


def test_state_restore(mem):
    dq, vq = make(mem)
    dq.add([b"a"])
    dq.add([b"b"])
    vq.push(vq.pop().head, 0)
    state = vq.state()
    other = Virtqueue(mem, 0, 8)
    other.restore(state)
    assert other.pop().reader().read(1) == b"b"
