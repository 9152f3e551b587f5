"""Wiring an NVMe controller into a MicroVM in one of three doorbell modes.

- ``"mmio"``: every doorbell write is an MMIO exit that the VMM serves in
  Python; the controller runs commands on the vCPU thread.
- ``"ioeventfd"``: the I/O queues run in the accelerator process; I/O
  doorbell writes signal its eventfd inside KVM (no exit to the VMM). The
  guest must configure the shadow doorbell buffer, because an ioeventfd
  carries no value: the accelerator reads the new tail from the buffer. The
  accelerator does not poll, so EventIdx asks for every doorbell.
- ``"shadow"``: as ioeventfd, and the accelerator keeps polling the shadow
  doorbells for ``poll_us`` after its last command with EventIdx left
  behind, so a busy guest writes only memory and takes no exits at all.

Completions raise MSI-X vectors through irqfds (a GSI route per vector);
a vector KVM cannot deliver (masked, or MSI-X off) is read here and handed
to the controller, which sets the pending bit or drives INTx.
"""
from __future__ import annotations

import os
import select
import threading
from typing import TYPE_CHECKING, Iterable

from hvkit.devices.nvme.controller import NvmeController
from hvkit.errors import ConfigError
from hvkit.platform.msi import KvmMsi, MsixIrqfds
from hvkit.vmm.attach import Attachment

if TYPE_CHECKING:
    from hvkit.storage.backend import BlockBackend
    from hvkit.vmm.runtime import Vmm

MODES = ("mmio", "ioeventfd", "shadow")


class NvmeAttachment(Attachment):
    """One controller on one VM, and the KVM objects that serve it.

    >>> vm.attach(NvmeAttachment([disk], mode="shadow")).ctrl
    """

    name = "nvme"

    def __init__(self, disks: Iterable["BlockBackend"], *, mode: str = "mmio",
                 poll_us: int = 200, slot: int | None = None, **controller_args) -> None:
        if mode not in MODES:
            raise ConfigError(f"NVMe doorbell mode {mode!r} is not one of {', '.join(MODES)}")
        self.disks = list(disks)
        self.mode = mode
        self.poll_us = poll_us
        self.slot = slot
        self.controller_args = controller_args
        self.name = f"nvme{'' if slot is None else slot}-{id(self):x}"
        self.vm = None
        self.ctrl: NvmeController | None = None
        self.acc = None
        self._doorbells: list[tuple[int, int]] = []
        self._irqfds = MsixIrqfds()
        self._stop_r, self._stop_w = -1, -1
        self._watcher: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def on_attach(self, vmm: "Vmm") -> None:
        self.vm = vmm.vm
        self.ctrl = NvmeController(vmm.memory, self.disks, msi=KvmMsi(self.vm),
                                   **self.controller_args)
        try:
            self.devfn = vmm.add_pci_device(self.ctrl, self.slot)
        except BaseException:
            self.ctrl.close()
            raise
        mode, poll_us = self.mode, self.poll_us
        if mode != "mmio":
            self.acc = self.ctrl.use_accelerator(poll_us=poll_us if mode == "shadow" else 0)
            self.ctrl.dbbuf_listeners.append(self._dbbuf_changed)
            self.ctrl.msix.add_listener(self._msix_changed)
            vmm.bar_listeners.append(self._bar_moved)
            self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
            self._watcher = threading.Thread(target=self._watch, name="hvkit-nvme-irq",
                                             daemon=True)
            self._watcher.start()

    # -- doorbells -------------------------------------------------------------
    def _set_doorbells(self, wanted: list[tuple[int, int]]) -> None:
        with self._lock:
            for addr, length in self._doorbells:
                self.vm.ioeventfd(self.acc.kick_fd, addr, length, deassign=True)
            self._doorbells = []
            for addr, length in wanted:
                self.vm.ioeventfd(self.acc.kick_fd, addr, length)
                self._doorbells.append((addr, length))

    def _dbbuf_changed(self, state) -> None:
        self._set_doorbells(self.ctrl.ioeventfd_doorbells() if state else [])

    def _bar_moved(self, device, index, old, new) -> None:
        if device is self.ctrl and index == 0 and self.ctrl.dbbuf:
            self._set_doorbells(self.ctrl.ioeventfd_doorbells())

    # -- interrupts ------------------------------------------------------------
    def _msix_changed(self, index: int | None) -> None:
        indices = range(self.ctrl.msix.vectors) if index is None else [index]
        with self._lock:
            for i in indices:
                self._irqfds.sync(self.vm, i, self.ctrl.msix.vector(i), self.acc.irq_fds[i])
        if self._stop_w >= 0:
            os.write(self._stop_w, b"r")    # the watcher re-reads which fds are its own

    def _watch(self) -> None:
        """Serve the vectors no irqfd takes (masked, MSI-X off, INTx)."""
        while True:
            with self._lock:
                fds = {self.acc.irq_fds[i]: i for i in range(len(self.acc.irq_fds))
                       if i not in self._irqfds.on}
            ready, _, _ = select.select([self._stop_r, *fds], [], [])
            for fd in ready:
                if fd == self._stop_r:
                    if os.read(self._stop_r, 64).endswith(b"q"):
                        return
                    continue
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    continue
                self.ctrl.service_irq(fds[fd])

    def on_resume(self) -> None:
        """After a snapshot stopped the accelerator process: a new one."""
        if self.acc is not None and not self.acc.alive():
            self.acc.restart()

    def state(self) -> dict:
        assert self.ctrl is not None
        return {"devfn": self.devfn, "mode": self.mode, "ctrl": self.ctrl.state()}

    def restore(self, state: dict) -> None:
        assert self.ctrl is not None
        if state.get("devfn") != self.devfn or state.get("mode") != self.mode:
            raise ConfigError(f"{self.name}: saved state is for another placement or mode "
                              f"(devfn {state.get('devfn')}, mode {state.get('mode')})")
        self.ctrl.restore(state["ctrl"])

    def close(self) -> None:
        if self.ctrl is None or self._closed:
            return
        self._closed = True
        if self._watcher is not None:
            os.write(self._stop_w, b"q")
            self._watcher.join(5)
            os.close(self._stop_r)
            os.close(self._stop_w)
            self._watcher = None
        self.ctrl.close()
