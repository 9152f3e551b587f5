"""The one interface for what lives with a VM: devices and services.

An attachment is added to a running-or-not VM with ``Vmm.attach(att)``.
It takes its resources through the public methods of the ``Vmm`` it is
given (buses, PCI, ioeventfd, irqfd, MSI routes, memory slots, hypercall
numbers) and hears the VM's lifecycle through the ``on_*`` methods. Its
``state()``/``restore()`` pair is what a snapshot saves and loads.

Every method has a default, so an attachment overrides what it needs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hvkit.vmm.runtime import Vmm

#: lifecycle events, in the order a VM goes through them
EVENTS = ("start", "pause", "resume", "stop")


class Attachment:
    """Base of devices and services attached to a VM."""

    #: a short name for messages and snapshots; unique per VM
    name: str = "attachment"
    #: True for what belongs to this process only (a lazy restore's pager,
    #: a dirty-page tracker): a snapshot leaves it out
    transient: bool = False

    def on_attach(self, vmm: "Vmm") -> None:
        """Take resources from the VM (called once, by ``Vmm.attach``)."""

    def on_start(self) -> None:
        """The vCPUs are about to run for the first time."""

    def on_pause(self) -> None:
        """Every vCPU is parked; guest memory holds still."""

    def on_resume(self) -> None:
        """The vCPUs run again after a pause."""

    def on_stop(self) -> None:
        """The vCPUs have stopped for good (guest exit, error, stop())."""

    def state(self) -> dict[str, Any]:
        """What a snapshot must keep of this attachment (JSON-able)."""
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        """Take back what ``state()`` returned, on a paused VM."""
        if state:
            raise NotImplementedError(f"{self.name} cannot restore saved state")

    def close(self) -> None:
        """Give back every resource (threads, fds, KVM objects); called
        once, in the reverse order of attachment, when the VM closes."""
