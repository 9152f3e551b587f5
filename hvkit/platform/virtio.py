"""Wiring a virtio device into a VM, over virtio-pci or virtio-mmio.

The device model (hvkit.devices.virtio) serves its queues on its own worker
thread, woken through one eventfd per queue. Here those eventfds become KVM
ioeventfds on the queues' notify addresses, so a guest's notification
reaches the worker without an exit to the VMM, and interrupts leave through
irqfds:

- PCI: ``vmm.add_pci_device(transport)``; ioeventfds on BAR 0's notify
  area (moved with the BAR); every unmasked MSI-X vector gets a GSI route
  and an irqfd. A masked vector, or MSI-X off, falls back to the transport:
  pending bits (sent on unmask, through KVM_SIGNAL_MSI when no route is
  left) or ISR + INTx on the slot's IOAPIC pin.
- MMIO: a 4 KiB window from ``layout.VIRTIO_MMIO_BASE`` on the MMIO bus,
  its interrupt an edge-triggered IOAPIC pin fed by an irqfd (as
  Firecracker does), one ioeventfd per queue on QueueNotify matched on the
  queue index. A Linux guest learns of it from ``virtio_mmio.device=`` on
  its command line, which is added here, so MMIO devices of a Linux VM are
  added before it starts.
"""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from hvkit.arch.x86 import layout
from hvkit.devices.virtio.device import VirtioDevice
from hvkit.devices.virtio.mmio import SIZE as MMIO_SIZE
from hvkit.devices.virtio.mmio import VirtioMmioTransport
from hvkit.devices.virtio.pci import BAR as NOTIFY_BAR
from hvkit.devices.virtio.pci import VirtioPciTransport
from hvkit.errors import ConfigError
from hvkit.platform.msi import MsixIrqfds
from hvkit.vmm.attach import Attachment

if TYPE_CHECKING:
    from hvkit.devices.pci.device import PciDevice
    from hvkit.kvm.vm import Vm
    from hvkit.vmm.runtime import Vmm

log = logging.getLogger(__name__)

TRANSPORTS = ("pci", "mmio")
assert MMIO_SIZE == layout.VIRTIO_MMIO_SIZE


def mmio_window(index: int) -> tuple[int, int]:
    """(base address, IOAPIC pin) of virtio-mmio window ``index``."""
    if not 0 <= index < len(layout.VIRTIO_MMIO_IRQS):
        raise ConfigError(f"virtio-mmio slot {index} is not one of "
                          f"0..{len(layout.VIRTIO_MMIO_IRQS) - 1}")
    return layout.VIRTIO_MMIO_BASE + index * layout.VIRTIO_MMIO_SIZE, \
        layout.VIRTIO_MMIO_IRQS[index]


class IrqfdPin:
    """An IrqLine for an edge-triggered IOAPIC pin behind an irqfd: every
    interrupt is one eventfd write, from whatever thread raises it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def pulse(self) -> None:
        os.eventfd_write(self.fd, 1)

    def set_level(self, level: bool) -> None:
        if level:                  # an edge pin hears only rising edges
            self.pulse()


class IrqfdMsi:
    """The MsiSender of a virtio-pci function: a message with a KVM route
    goes out through its irqfd; any other through KVM_SIGNAL_MSI."""

    def __init__(self, vm: "Vm") -> None:
        self.vm = vm
        #: (address, data) -> irqfd, for the vectors routed now
        self.routed: dict[tuple[int, int], int] = {}

    def signal_msi(self, address: int, data: int) -> None:
        fd = self.routed.get((address, data))
        if fd is not None:
            os.eventfd_write(fd, 1)
        else:
            self.vm.signal_msi(address, data)


class VirtioAttachment(Attachment):
    """One virtio device on one VM, and the KVM objects that serve it.

    >>> vm.attach(VirtioAttachment(VirtioRng(vm.memory), transport="mmio"))

    ``slot`` is the PCI slot (transport "pci") or the virtio-mmio window
    index (transport "mmio"); None takes the first free one. The attachment
    owns the device: ``close()`` closes it.
    """

    def __init__(self, device: VirtioDevice, transport: str = "pci",
                 slot: int | None = None) -> None:
        if not isinstance(device, VirtioDevice):
            raise ConfigError(f"{device!r} is not a virtio device")
        if transport not in TRANSPORTS:
            raise ConfigError(f"virtio transport {transport!r} is not one of "
                              f"{', '.join(TRANSPORTS)}")
        if slot is not None and (isinstance(slot, bool) or not isinstance(slot, int)):
            raise ConfigError(f"virtio slot must be an integer, not {slot!r}")
        self.device = device
        self.kind = transport
        self.slot = slot
        self.name = f"virtio-{device.name}-{id(self):x}"
        self.vm: "Vm | None" = None
        self.transport: VirtioPciTransport | VirtioMmioTransport | None = None
        #: PCI: the function's devfn; MMIO: the window's base and IOAPIC pin
        self.devfn: int | None = None
        self.mmio_index: int | None = None
        self.base: int | None = None
        self.irq: int | None = None
        self._ioeventfds: list[tuple[int, int, int, int | None]] = []
        self._irq_fds: list[int] = []
        self._irqfds = MsixIrqfds()
        self._msi: IrqfdMsi | None = None
        self._closed = False

    # -- attaching -------------------------------------------------------------

    def on_attach(self, vmm: "Vmm") -> None:
        if vmm.state != "created":
            raise ConfigError("virtio devices are added before the VM starts")
        if self.device.mem is not vmm.memory:
            raise ConfigError(f"virtio-{self.device.name} was made for another VM's memory")
        self.vm = vmm.vm
        try:
            if self.kind == "pci":
                self._attach_pci(vmm)
            else:
                self._attach_mmio(vmm)
        except BaseException:
            self._release()
            raise

    def _attach_pci(self, vmm: "Vmm") -> None:
        self._msi = IrqfdMsi(self.vm)
        t = self.transport = VirtioPciTransport(self.device, self._msi)
        self._irq_fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                         for _ in range(t.msix.vectors)]
        self.devfn = vmm.add_pci_device(t, self.slot)
        t.msix.add_listener(self._msix_changed)
        vmm.bar_listeners.append(self._bar_moved)
        self._set_ioeventfds([(a, n, fd, None) for a, n, fd in t.notify_addresses()])

    def _attach_mmio(self, vmm: "Vmm") -> None:
        taken = {a.mmio_index for a in vmm.attachments
                 if isinstance(a, VirtioAttachment) and a.mmio_index is not None}
        if self.slot is None:
            free = [i for i in range(len(layout.VIRTIO_MMIO_IRQS)) if i not in taken]
            if not free:
                raise ConfigError(f"all {len(layout.VIRTIO_MMIO_IRQS)} virtio-mmio slots "
                                  f"are taken")
            index = free[0]
        elif self.slot in taken:
            raise ConfigError(f"virtio-mmio slot {self.slot} is taken")
        else:
            index = self.slot
        base, irq = mmio_window(index)
        t = VirtioMmioTransport(self.device, None, edge=True)
        if vmm.linux is not None:
            from hvkit.vmm.loaders import append_cmdline
            append_cmdline(vmm, t.cmdline_token(base, irq))
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._irq_fds = [fd]
        t.irq = IrqfdPin(fd)
        self.transport = t
        self.vm.irqfd(fd, irq)
        self._irqfds.gsis[0] = irq
        self._irqfds.on.add(0)
        vmm.add_device(vmm.mmio_bus, base, MMIO_SIZE, t, f"virtio-mmio.{index}")
        self.mmio_index, self.base, self.irq = index, base, irq
        self._set_ioeventfds([(a, n, fd, m) for a, n, m, fd in t.notify_addresses(base)])

    # -- notifications -----------------------------------------------------------

    def _set_ioeventfds(self, wanted: list[tuple[int, int, int, int | None]]) -> None:
        """Replace the registered ioeventfds by ``wanted``: (address, width,
        eventfd, datamatch or None)."""
        for addr, length, fd, match in self._ioeventfds:
            self.vm.ioeventfd(fd, addr, length, datamatch=match, deassign=True)
        self._ioeventfds = []
        for addr, length, fd, match in wanted:
            self.vm.ioeventfd(fd, addr, length, datamatch=match)
            self._ioeventfds.append((addr, length, fd, match))

    def _bar_moved(self, device: "PciDevice", index: int, old: int | None,
                   new: int | None) -> None:
        t = self.transport
        if device is t and index == NOTIFY_BAR and not self._closed:
            self._set_ioeventfds([(a, n, fd, None) for a, n, fd in t.notify_addresses()])

    # -- MSI-X ---------------------------------------------------------------------

    def _msix_changed(self, index: int | None) -> None:
        """Keep one GSI route + irqfd per unmasked vector (called under the
        MSI-X lock, so no message goes out while the table is rebuilt)."""
        if self._closed:
            return
        msix = self.transport.msix
        for i in range(msix.vectors) if index is None else [index]:
            self._irqfds.sync(self.vm, i, msix.vector(i), self._irq_fds[i])
        routed = {}
        for i in self._irqfds.on:
            vec = msix.vector(i)
            routed[(vec.address, vec.data)] = self._irq_fds[i]
        self._msi.routed = routed

    # -- lifecycle and snapshots --------------------------------------------------------

    def on_pause(self) -> None:
        """The device stops too: guest memory holds still while paused."""
        self.device.pause()

    def on_resume(self) -> None:
        self.device.resume()

    def state(self) -> dict[str, Any]:
        if self.transport is None:
            return {}
        return {"transport": self.kind, "devfn": self.devfn, "mmio_index": self.mmio_index,
                "state": self.transport.state()}

    def restore(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if state.get("transport") != self.kind or state.get("devfn") != self.devfn \
                or state.get("mmio_index") != self.mmio_index:
            raise ConfigError(f"{self.name}: saved state is for another placement "
                              f"({state.get('transport')}, devfn {state.get('devfn')}, "
                              f"mmio slot {state.get('mmio_index')})")
        self.transport.restore(state["state"])

    def _release(self) -> None:
        vm = self.vm
        if vm is not None and vm.fd >= 0:
            for addr, length, fd, match in self._ioeventfds:
                try:
                    vm.ioeventfd(fd, addr, length, datamatch=match, deassign=True)
                except OSError as exc:
                    log.debug("%s: ioeventfd release: %s", self.name, exc)
            for i in list(self._irqfds.on):
                try:
                    vm.irqfd(self._irq_fds[i], self._irqfds.gsis[i], deassign=True)
                except OSError as exc:
                    log.debug("%s: irqfd release: %s", self.name, exc)
            if self.kind == "pci":
                for gsi in self._irqfds.gsis.values():
                    vm.remove_route(gsi)
        self._ioeventfds = []
        self._irqfds.on.clear()
        self._irqfds.gsis.clear()
        if self._msi is not None:
            self._msi.routed = {}
        self.device.close()
        for fd in self._irq_fds:
            os.close(fd)
        self._irq_fds = []

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._release()
