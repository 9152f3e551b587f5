"""VirtioAttachment without KVM: what it registers with the VM (ioeventfds,
irqfds, MSI routes, bus windows, command-line tokens) and how it follows
BAR moves and MSI-X masking."""
from __future__ import annotations

import os
import struct
from types import SimpleNamespace

import pytest

from hvkit.arch.x86 import layout
from hvkit.devices.bus import Bus
from hvkit.devices.pci import constants as C
from hvkit.devices.virtio.rng import VirtioRng
from hvkit.devices.virtio.vsock import VirtioVsock
from hvkit.errors import ConfigError
from hvkit.memory.guest import GuestMemory
from hvkit.platform.virtio import VirtioAttachment
from hvkit.vmm.pci import PciPlatform


class FakeVm:
    fd = 3

    def __init__(self) -> None:
        self.ioeventfds: dict[tuple[int, int | None], int] = {}
        self.irqfds: dict[int, int] = {}
        self.routes: dict[int, tuple[int, int]] = {}
        self.signalled: list[tuple[int, int]] = []
        self.lines: list[tuple[int, bool]] = []

    def ioeventfd(self, fd, addr, length, *, pio=False, datamatch=None, deassign=False):
        key = (addr, datamatch)
        if deassign:
            assert self.ioeventfds.pop(key) == fd
        else:
            assert key not in self.ioeventfds
            self.ioeventfds[key] = fd

    def irqfd(self, fd, gsi, *, resample_fd=None, deassign=False):
        if deassign:
            assert self.irqfds.pop(fd) == gsi
        else:
            self.irqfds[fd] = gsi

    def add_msi_route(self, address, data, gsi=None):
        gsi = gsi if gsi is not None else 24 + len(self.routes)
        self.routes[gsi] = (address, data)
        return gsi

    def remove_route(self, gsi):
        self.routes.pop(gsi)

    def signal_msi(self, address, data):
        self.signalled.append((address, data))

    def irq_line(self, gsi, level):
        self.lines.append((gsi, level))


class FakeVmm:
    def __init__(self) -> None:
        self.state = "created"
        self.memory = GuestMemory.create(4 << 20)
        self.vm = FakeVm()
        self.linux = None
        self.cmdline = None
        self.io_bus, self.mmio_bus = Bus("io"), Bus("mmio")
        self.bar_listeners = []
        self.pci = None
        self._atts = []

    @property
    def attachments(self):
        return tuple(self._atts)

    def attach(self, att):
        att.on_attach(self)
        self._atts.append(att)
        return att

    def add_device(self, bus, base, length, device, name=None):
        bus.register(base, length, device, name)

    def add_pci_device(self, device, slot=None):
        if self.pci is None:
            self.pci = PciPlatform(self)
        return self.pci.add(device, slot)


@pytest.fixture
def vmm():
    v = FakeVmm()
    yield v
    for a in reversed(v.attachments):
        a.close()
    v.memory.close()


def bar0(att) -> int:
    return att.transport.bars[0].mapped_at


def test_pci_notifications_follow_the_bar(vmm):
    att = vmm.attach(VirtioAttachment(VirtioRng(vmm.memory), "pci"))
    base = bar0(att)
    assert layout.VIRTIO_MMIO_BASE > base >= 0xC000_0000
    assert vmm.vm.ioeventfds == {(base + 0x3000, None): att.device.notify_fd(0)}
    new = base + 0x10_0000
    att.transport.config_write(C.BAR0, struct.pack("<I", new | 0x4))
    assert vmm.vm.ioeventfds == {(new + 0x3000, None): att.device.notify_fd(0)}
    att.transport.config_write(C.COMMAND, struct.pack("<H", 0))      # decoding off
    assert vmm.vm.ioeventfds == {}


def msix_entry(att, i, address, data, masked):
    for k, v in enumerate((address, 0, data, int(masked))):
        att.transport.msix.write_table(16 * i + 4 * k, struct.pack("<I", v))


def test_msix_vectors_get_routes_and_masked_ones_wait(vmm):
    att = vmm.attach(VirtioAttachment(VirtioRng(vmm.memory), "pci"))
    t = att.transport
    cap = t.msix.cap_offset
    t.config_write(cap + 2, struct.pack("<H", 0x8000))               # MSI-X on
    msix_entry(att, 1, 0xFEE0_0000, 0x45, masked=False)
    fd = att._irq_fds[1]
    gsi = vmm.vm.irqfds[fd]
    assert vmm.vm.routes[gsi] == (0xFEE0_0000, 0x45)
    t.queue_vectors[0] = 1
    t.signal_queue(0)
    assert os.eventfd_read(fd) == 1 and vmm.vm.signalled == []       # through the irqfd
    msix_entry(att, 1, 0xFEE0_0000, 0x45, masked=True)
    assert fd not in vmm.vm.irqfds
    t.signal_queue(0)
    assert t.msix.pending(1)
    msix_entry(att, 1, 0xFEE0_0000, 0x46, masked=False)              # unmask: sent now
    assert vmm.vm.routes[vmm.vm.irqfds[fd]] == (0xFEE0_0000, 0x46)
    assert os.eventfd_read(fd) == 1 and not t.msix.pending(1)
    t.config_write(cap + 2, struct.pack("<H", 0))                    # MSI-X off: INTx
    assert fd not in vmm.vm.irqfds
    t.signal_queue(0)
    assert vmm.vm.lines[-1] == (16 + (att.devfn >> 3) % 8, True)


def test_mmio_windows_pins_and_linux_command_line(vmm):
    vmm.linux = SimpleNamespace(cmdline_addr=0x20000)
    vmm.cmdline = "console=ttyS0"
    a = vmm.attach(VirtioAttachment(VirtioRng(vmm.memory), "mmio"))
    b = vmm.attach(VirtioAttachment(VirtioRng(vmm.memory), "mmio"))
    assert (a.base, a.irq, b.base, b.irq) == (0xD000_0000, 5, 0xD000_1000, 6)
    assert vmm.cmdline == ("console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 "
                           "virtio_mmio.device=4K@0xd0001000:6")
    assert vmm.memory.read(0x20000, len(vmm.cmdline) + 1) == vmm.cmdline.encode() + b"\0"
    assert vmm.vm.ioeventfds[(0xD000_0050, 0)] == a.device.notify_fd(0)
    assert vmm.mmio_bus.read(0xD000_1000, 4) == b"virt"
    assert vmm.vm.irqfds[a._irq_fds[0]] == 5
    a.device.transport.signal_queue(0)                               # edge: one irqfd write
    assert os.eventfd_read(a._irq_fds[0]) == 1


def test_bad_placements_are_config_errors(vmm, tmp_path):
    vmm.attach(VirtioAttachment(VirtioRng(vmm.memory), "mmio", slot=7))
    for att in (VirtioAttachment(VirtioRng(vmm.memory), "mmio", slot=7),
                VirtioAttachment(VirtioRng(vmm.memory), "mmio", slot=8)):
        with pytest.raises(ConfigError):
            vmm.attach(att)
        assert att.device.closed                                     # nothing left open
    for i in range(7):
        vmm.attach(VirtioAttachment(VirtioRng(vmm.memory), "mmio"))
    with pytest.raises(ConfigError, match="taken"):
        vmm.attach(VirtioAttachment(VirtioRng(vmm.memory), "mmio"))
    with pytest.raises(ConfigError, match="vsock"):
        VirtioVsock(vmm.memory, 3, str(tmp_path / "missing" / "v.sock"))
    vmm.state = "running"
    with pytest.raises(ConfigError, match="before the VM starts"):
        vmm.attach(VirtioAttachment(VirtioRng(vmm.memory), "pci"))


def test_state_round_trip_and_close(vmm):
    att = vmm.attach(VirtioAttachment(VirtioRng(vmm.memory), "pci"))
    att.on_pause()
    assert att.device.worker.held                                    # a paused VM's device waits
    att.on_resume()
    assert not att.device.worker.held
    state = att.state()
    assert state["transport"] == "pci" and state["devfn"] == att.devfn
    att.restore(state)
    with pytest.raises(ConfigError):
        att.restore(dict(state, devfn=att.devfn + 8))
    att.close()
    assert vmm.vm.ioeventfds == {} and vmm.vm.irqfds == {} and att.device.closed
