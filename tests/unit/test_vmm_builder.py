"""The builder's decisions, checked without /dev/kvm: memory layout, the
port map, PCI BARs and INTx lines, CPUID per vCPU."""
import pytest

from hvkit.arch.x86 import cpuid, layout
from hvkit.devices.pci import constants as PCI
from hvkit.devices.pci.bar import BarKind
from hvkit.devices.pci.device import PciDevice
from hvkit.errors import ConfigError
from hvkit.kvm.structs import CpuidEntry
from hvkit.memory.guest import GuestMemory
from hvkit.vmm.builder import RegionPlan, build_legacy_platform, cpuid_plan, memory_plan
from hvkit.vmm.config import PortMap, VmConfig
from hvkit.vmm.loaders import boot_stack
from hvkit.vmm.pci import intx_gsi
from hvkit.vmm.runtime import Vmm
from hvkit.arch.x86.profiles import NONE

GiB = 1 << 30


def test_memory_below_the_pci_hole_is_one_region():
    assert memory_plan(VmConfig(guest="hello", memory="64M")) == [RegionPlan(0, 64 << 20,
                                                                             "ram-low")]


def test_memory_past_the_hole_continues_above_4g():
    plan = memory_plan(VmConfig(guest="hello", memory="4G"))
    assert plan == [RegionPlan(0, layout.MMIO_HOLE_START, "ram-low"),
                    RegionPlan(layout.MMIO_HOLE_END, 4 * GiB - layout.MMIO_HOLE_START,
                               "ram-high")]


def unbuilt(**kwargs):
    config = VmConfig(guest="hello", native_devices=False, **kwargs)
    vmm = Vmm(config)
    vmm.memory = GuestMemory.create(4 << 20)
    return vmm


def test_legacy_ports_follow_the_port_map():
    vmm = unbuilt(ports=PortMap(hypercall=0x600, rtc=None, post=None))
    build_legacy_platform(vmm)
    names = {m.name: m.base for m in vmm.io_bus}
    assert names == {"com1": 0x3F8, "exit": 0x500, "hypercall": 0x600, "i8042": 0x60}
    assert vmm.rtc is None and vmm.hypercalls is not None
    assert vmm.io_bus.find(0x510) is None
    vmm.memory.close()


class Dev(PciDevice):
    def __init__(self, bars):
        super().__init__(0x1234, 0x5678, 0x010802)
        for i, (size, kind) in enumerate(bars):
            self.add_bar(i, size, kind, Region(size))


class Region:
    def __init__(self, size):
        self.size = size

    def read(self, offset, size):
        return bytes(size)

    def write(self, offset, data):
        pass


def test_pci_bars_and_intx_lines():
    vmm = unbuilt()
    a = Dev([(0x4000, BarKind.MEM32)])
    b = Dev([(0x100, BarKind.IO), (0x10_0000, BarKind.MEM32)])
    assert vmm.add_pci_device(a) == 1 << 3           # slot 0 is the host bridge
    assert vmm.add_pci_device(b, slot=9) == 9 << 3
    assert a.bars[0].mapped_at == PCI.PCI_MMIO_BASE
    assert b.bars[1].mapped_at % 0x10_0000 == 0 and b.bars[1].mapped_at >= PCI.PCI_MMIO_BASE
    assert b.bars[0].mapped_at >= PCI.PCI_IO_BASE
    assert vmm.pci_irqs == [(1, 0, 17), (9, 0, 17)]
    assert intx_gsi(9 << 3) == 17 and intx_gsi(2 << 3) == 18
    # the BARs are on the VM's buses where the guest will look
    assert vmm.mmio_bus.find(a.bars[0].mapped_at).device is a.bars[0].region
    assert vmm.io_bus.find(b.bars[0].mapped_at) is not None
    with pytest.raises(ConfigError, match="taken"):
        vmm.add_pci_device(Dev([]), slot=9)
    vmm.memory.close()


def test_cpuid_per_vcpu_carries_its_apic_id():
    supported = [CpuidEntry(0, 0, 0, 0xD, *(int.from_bytes(b, "little")
                                           for b in (b"Auth", b"cAMD", b"enti"))),
                 CpuidEntry(1, 0, 0, 0x800F12, 0, 1 << 23, 0)]
    config = VmConfig(kernel="vmlinux", vcpus=4)
    for i in range(4):
        leaf1 = cpuid.find(cpuid_plan(supported, config, i, NONE), 1)
        assert leaf1.ebx >> 24 == i and (leaf1.ebx >> 16) & 0xFF == 4
        assert leaf1.ecx >> 31 == 1                  # running under a hypervisor


def test_cpuid_editing_helpers():
    entries = [CpuidEntry(0, 0, 0, 0xD, *(int.from_bytes(b, "little")
                                         for b in (b"Genu", b"ntel", b"ineI")))]
    assert cpuid.vendor(entries) == "GenuineIntel"
    cpuid.set_vendor(entries, "hvkitHVKITvm")
    assert cpuid.vendor(entries) == "hvkitHVKITvm"
    cpuid.set_feature(entries, "popcnt", False)
    cpuid.set_feature(entries, "x2apic", True)
    assert cpuid.has_feature(entries, "x2apic") and not cpuid.has_feature(entries, "popcnt")
    cpuid.set_leaf(entries, 0x40000000, eax=0x40000001, ebx=1)
    assert cpuid.find(entries, 0x40000000).ebx == 1
    with pytest.raises(ConfigError):
        cpuid.set_leaf(entries, 1, eax=1 << 32)
    with pytest.raises(ConfigError):
        cpuid.set_vendor(entries, "short")


def test_boot_stacks_hold_every_freestanding_vcpu():
    from hvkit.vmm.config import MAX_FREESTANDING_VCPUS
    tops = [boot_stack(i) for i in range(MAX_FREESTANDING_VCPUS)]
    assert len(set(tops)) == len(tops)
    assert min(tops) - layout.BOOT_STACK_SIZE >= layout.PD_ADDR + layout.PD_COUNT * 0x1000
