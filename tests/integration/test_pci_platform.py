"""PCI devices plugged into a MicroVM: config space on 0xCF8, BARs on the buses."""
import struct

import pytest

from hvkit.devices.pci.bar import BarKind
from hvkit.devices.pci.device import PciDevice
from hvkit.errors import HvkitError

pytestmark = pytest.mark.kvm


class Regs:
    def __init__(self):
        self.data = bytearray(4096)

    def read(self, offset, size):
        return bytes(self.data[offset:offset + size])

    def write(self, offset, data):
        self.data[offset:offset + len(data)] = data


def cfg_read(vm, devfn, reg):
    vm.io_bus.write(0xCF8, struct.pack("<I", 0x8000_0000 | devfn << 8 | reg))
    return struct.unpack("<I", vm.io_bus.read(0xCFC, 4))[0]


def cfg_write(vm, devfn, reg, value):
    vm.io_bus.write(0xCF8, struct.pack("<I", 0x8000_0000 | devfn << 8 | reg))
    vm.io_bus.write(0xCFC, struct.pack("<I", value))


def test_device_is_visible_and_its_bar_is_mapped(microvm):
    vm = microvm("hello")
    dev = PciDevice(0x1234, 0x5678, 0x018000, name="toy")
    regs = Regs()
    dev.add_bar(0, 0x1000, BarKind.MEM32, regs)
    devfn = vm.add_pci_device(dev)
    assert cfg_read(vm, 0, 0) & 0xFFFF != 0xFFFF            # host bridge at 00:00.0
    assert cfg_read(vm, devfn, 0) == 0x5678_1234
    assert cfg_read(vm, devfn + 8, 0) == 0xFFFF_FFFF        # empty slot
    bar = cfg_read(vm, devfn, 0x10) & ~0xF
    assert 0xC000_0000 <= bar < 0xFEC0_0000
    vm.mmio_bus.write(bar + 8, b"\xAA")
    assert regs.data[8] == 0xAA
    # The guest moves the BAR: the MMIO bus follows.
    moved = []
    vm.bar_listeners.append(lambda d, i, old, new: moved.append((old, new)))
    cfg_write(vm, devfn, 0x10, 0xD000_0000)
    assert moved == [(bar, 0xD000_0000)]
    vm.mmio_bus.write(0xD000_0010, b"\xBB")
    assert regs.data[0x10] == 0xBB
    assert vm.mmio_bus.find(bar) is None
    # Memory decoding off: unmapped.
    cfg_write(vm, devfn, 0x04, 0)
    assert vm.mmio_bus.find(0xD000_0000) is None
    assert vm.pci_irqs == [(devfn >> 3, 0, 16 + (devfn >> 3))]


def test_pci_devices_only_before_start(microvm):
    vm = microvm("hello")
    vm.run(timeout=20)
    with pytest.raises(HvkitError, match="before the VM starts"):
        vm.add_pci_device(PciDevice(1, 2, 0))
