"""virtio: split virtqueues, the MMIO and PCI transports, and the devices.

Device models know nothing of KVM: a transport is a register window on a
bus (``VirtioMmioTransport``) or a PCI function (``VirtioPciTransport``);
interrupts leave through an IrqLine or an MsiSender; queue notifications
wake the device's worker thread through an eventfd that the machine may
register as an ioeventfd.
"""
from hvkit.devices.virtio.blk import VirtioBlk
from hvkit.devices.virtio.chain import Chain, ChainError, QueueBroken, VirtioError
from hvkit.devices.virtio.console import VirtioConsole
from hvkit.devices.virtio.device import VirtioDevice
from hvkit.devices.virtio.mmio import NotifyRegion, VirtioMmioTransport, cmdline_token
from hvkit.devices.virtio.net import VirtioNet
from hvkit.devices.virtio.pci import VirtioPciTransport
from hvkit.devices.virtio.queue import Virtqueue
from hvkit.devices.virtio.rng import VirtioRng
from hvkit.devices.virtio.vsock import VirtioVsock

__all__ = ["Chain", "ChainError", "NotifyRegion", "QueueBroken", "VirtioBlk",
           "VirtioConsole", "VirtioDevice", "VirtioError", "VirtioMmioTransport", "VirtioNet",
           "VirtioPciTransport", "VirtioRng", "VirtioVsock", "Virtqueue", "cmdline_token"]
