"""The KVM layer alone, as a VMM author uses it: slots, modes, exits, state."""
import errno
import os
import select
import struct

import pytest

from hvkit.arch.x86.modes import setup_mode
from hvkit.errors import KvmError
from hvkit.kvm import Kvm
from hvkit.kvm.caps import ExitReason
from hvkit.kvm.exits import HltExit, IoExit, MmioExit
from hvkit.kvm.vm import MEM_LOG_DIRTY_PAGES, MEM_READONLY
from hvkit.memory.guest import GuestMemory, MemoryRegion

pytestmark = pytest.mark.kvm

CODE = 0x1000
# mov $0x42,%al; out %al,$0x10; hlt   (real mode)
REAL = bytes([0xB0, 0x42, 0xE6, 0x10, 0xF4])
# mov $0x12345678,%eax; out %eax,$0x10; hlt   (32- and 64-bit)
WIDE = bytes([0xB8, 0x78, 0x56, 0x34, 0x12, 0xE7, 0x10, 0xF4])


def mov_store(addr: int, value: int) -> bytes:
    """mov $value,%eax; mov %eax,(moffs64)   (64-bit)"""
    return bytes([0xB8]) + struct.pack("<I", value) + bytes([0xA3]) + struct.pack("<Q", addr)


@pytest.fixture
def machine():
    kvm = Kvm()
    vm = kvm.create_vm()
    mem = GuestMemory.create(4 << 20)
    vm.map_region(mem.regions[0], 0)
    vcpu = vm.create_vcpu(0)
    yield kvm, vm, vcpu, mem
    vm.close()
    mem.close()
    kvm.close()


def run_until_not(vcpu, reasons=()):
    ex = vcpu.run()
    while ex.reason in reasons:
        ex = vcpu.run()
    return ex


@pytest.mark.parametrize("mode,code,size,value", [
    ("real", REAL, 1, 0x42),
    ("protected", WIDE, 4, 0x12345678),
    ("long", WIDE, 4, 0x12345678),
])
def test_each_cpu_mode_runs_code_and_decodes_exits(machine, mode, code, size, value):
    _, vm, vcpu, mem = machine
    mem.write(CODE, code)
    setup_mode(vcpu, mem, mode, CODE, stack=0x8000)
    ex = vcpu.run()
    assert isinstance(ex, IoExit)
    assert (ex.port, ex.size, ex.is_out) == (0x10, size, True)
    assert int.from_bytes(ex.data, "little") == value
    assert isinstance(vcpu.run(), HltExit)
    regs = vcpu.get_regs()
    assert regs.rip == CODE + len(code)


def test_mmio_exit_for_unbacked_address(machine):
    _, vm, vcpu, mem = machine
    mem.write(CODE, mov_store(0xD000_0000, 0xCAFEF00D) + b"\xf4")
    setup_mode(vcpu, mem, "long", CODE)
    ex = vcpu.run()
    assert isinstance(ex, MmioExit)
    assert (ex.address, ex.size, ex.is_write) == (0xD000_0000, 4, True)
    assert ex.data == struct.pack("<I", 0xCAFEF00D)


def test_readonly_slot_turns_writes_into_mmio_exits(machine):
    _, vm, vcpu, mem = machine
    ro = MemoryRegion(0x100_0000, 0x1000, name="rom")
    ro.open()
    ro.mapping[:4] = b"ROM!"
    vm.map_region(ro, 1, read_only=True)
    assert vm.slots[1].flags & MEM_READONLY
    mem.write(CODE, mov_store(0x100_0000, 0x11223344) + b"\xf4")
    setup_mode(vcpu, mem, "long", CODE)
    ex = vcpu.run()
    assert isinstance(ex, MmioExit) and ex.is_write and ex.address == 0x100_0000
    assert ro.mapping[:4] == b"ROM!"
    ro.close()


def test_dirty_log_reports_exactly_the_written_pages(machine):
    _, vm, vcpu, mem = machine
    data = MemoryRegion(0x100_0000, 16 * 4096, name="data")
    data.open()
    vm.map_region(data, 1, log_dirty=True)
    code = b"".join(mov_store(0x100_0000 + p * 4096 + 8, p) for p in (3, 5, 11)) + b"\xf4"
    mem.write(CODE, code)
    setup_mode(vcpu, mem, "long", CODE)
    assert isinstance(vcpu.run(), HltExit)
    bitmap = int.from_bytes(vm.get_dirty_log(1), "little")
    assert [p for p in range(16) if bitmap >> p & 1] == [3, 5, 11]
    assert int.from_bytes(vm.get_dirty_log(1), "little") == 0     # cleared by the read
    data.close()


def test_ioeventfd_completes_writes_without_an_exit(machine):
    _, vm, vcpu, mem = machine
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    vm.ioeventfd(efd, 0x10, 4, pio=True)
    mem.write(CODE, WIDE)
    setup_mode(vcpu, mem, "long", CODE)
    assert isinstance(vcpu.run(), HltExit)     # the out never reached user space
    assert os.eventfd_read(efd) == 1
    vm.ioeventfd(efd, 0x10, 4, pio=True, deassign=True)
    os.close(efd)


def test_ioeventfd_datamatch(machine):
    _, vm, vcpu, mem = machine
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    vm.ioeventfd(efd, 0x10, 4, pio=True, datamatch=0x1)
    mem.write(CODE, WIDE)
    setup_mode(vcpu, mem, "long", CODE)
    assert isinstance(vcpu.run(), IoExit)      # value differs: a normal exit
    assert not select.select([efd], [], [], 0)[0]
    os.close(efd)


def test_irqchip_irqfd_msi_and_routes(machine):
    kvm = Kvm()
    vm = kvm.create_vm()
    vm.create_irqchip()
    vm.create_pit2()
    vm.create_vcpu(0)
    efd = os.eventfd(0)
    gsi = vm.add_msi_route(0xFEE0_0000, 0x31)
    vm.irqfd(efd, gsi)
    os.eventfd_write(efd, 1)                   # accepted by KVM
    vm.irqfd(efd, gsi, deassign=True)
    vm.irq_line(4, True)
    vm.irq_line(4, False)
    assert vm.signal_msi(0xFEE0_0000, 0x32) >= 0
    assert len(vm.get_irqchip(2)) == 520
    assert len(vm.get_pit2()) == 112
    os.close(efd)
    vm.close()
    kvm.close()


def test_vcpu_state_roundtrips(machine):
    kvm, vm, vcpu, mem = machine
    regs = vcpu.get_regs()
    regs.rbx, regs.r15 = 0x1234, 0x5678
    vcpu.set_regs(regs)
    assert vcpu.get_regs().r15 == 0x5678
    sregs = vcpu.get_sregs()
    sregs.cr2 = 0xABC000
    vcpu.set_sregs(sregs)
    assert vcpu.get_sregs().cr2 == 0xABC000
    vcpu.set_msrs({0xC0000102: 0xFFFF8000_00001000})
    assert vcpu.get_msrs([0xC0000102]) == {0xC0000102: 0xFFFF8000_00001000}
    table = kvm.supported_cpuid()
    vcpu.set_cpuid2(table)
    assert len(vcpu.get_cpuid2()) == len(table)
    fpu = vcpu.get_fpu()
    fpu.fcw, fpu.xmm = 0x27F, bytes(range(256))
    vcpu.set_fpu(fpu)
    back = vcpu.get_fpu()
    assert (back.fcw, back.xmm) == (0x27F, bytes(range(256)))
    xsave = vcpu.get_xsave()
    vcpu.set_xsave(xsave)
    xcrs = vcpu.get_xcrs()
    vcpu.set_xcrs(xcrs)
    events = vcpu.get_vcpu_events()
    vcpu.set_vcpu_events(events)
    assert vcpu.get_mp_state() == 0
    khz = vcpu.get_tsc_khz()
    assert khz > 100_000
    vcpu.set_tsc_khz(khz)


def test_lapic_state(machine):
    kvm = Kvm()
    vm = kvm.create_vm()
    vm.create_irqchip()
    vcpus = [vm.create_vcpu(i) for i in range(2)]
    for i, v in enumerate(vcpus):
        lapic = v.get_lapic()
        assert lapic.apic_id == i
        lapic.set(0x80, 0x20)                  # task priority
        v.set_lapic(lapic)
        assert v.get_lapic().get(0x80) == 0x20
    vm.close()
    kvm.close()


def test_errors_name_the_call_and_errno(machine):
    _, vm, vcpu, _ = machine
    with pytest.raises(KvmError) as info:
        vm.create_vcpu(0)
    assert info.value.errno == errno.EEXIST
    assert "KVM_CREATE_VCPU(0)" in str(info.value) and "EEXIST" in str(info.value)
    with pytest.raises(KvmError, match="KVM_GET_MSRS.*0x12345678"):
        vcpu.get_msrs([0x12345678])


def test_capability_checks(machine):
    kvm, vm, _, _ = machine
    assert kvm.has("USER_MEMORY") and kvm.has("IRQCHIP")
    assert kvm.check_extension("NR_MEMSLOTS") > 8
    assert vm.check_extension("KVM_CAP_IOEVENTFD") > 0
    assert kvm.vcpu_mmap_size >= 4096
    assert 0x10 in kvm.msr_index_list()        # IA32_TSC
    assert isinstance(kvm.feature_msrs(), dict)


def test_immediate_exit_returns_interrupted(machine):
    _, vm, vcpu, mem = machine
    mem.write(CODE, REAL)
    setup_mode(vcpu, mem, "real", CODE)
    vcpu.immediate_exit = True
    assert vcpu.run().reason == ExitReason.INTR
    vcpu.immediate_exit = False
    assert isinstance(vcpu.run(), IoExit)


def test_binary_stats_count_exits(machine):
    kvm, vm, vcpu, mem = machine
    if not kvm.has("BINARY_STATS_FD"):
        pytest.skip("this host's KVM lacks KVM_CAP_BINARY_STATS_FD")
    mem.write(CODE, WIDE)
    setup_mode(vcpu, mem, "long", CODE)
    before = vcpu.stats()["exits"]
    assert isinstance(vcpu.run(), IoExit)
    assert isinstance(vcpu.run(), HltExit)
    assert vcpu.stats()["exits"] >= before + 2
