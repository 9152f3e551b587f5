"""MicroVM: the front door. A few keyword arguments in, a built VM out.

It reads its arguments into a ``VmConfig`` (hvkit.vmm.config), builds with
``hvkit.vmm.builder.build`` and is the ``Vmm`` runtime itself, so all of
hvkit.vmm.runtime's lifecycle and attachment interface is here too.
"""
from __future__ import annotations

import os
from typing import IO, TYPE_CHECKING, Any

from hvkit.errors import ConfigError
from hvkit.platform.msi import KvmMsi  # noqa: F401 (re-exported for embedders)
from hvkit.vmm.builder import Loader, build, default_kvm  # noqa: F401
from hvkit.vmm.config import MAX_VCPUS, EntryState, PortMap, VmConfig  # noqa: F401
from hvkit.vmm.reaper import wait_for_closes  # noqa: F401 (re-exported)
from hvkit.vmm.runtime import Vmm

if TYPE_CHECKING:
    from hvkit.arch.x86.profiles import HostProfile
    from hvkit.kvm.system import Kvm
    from hvkit.storage.backend import BlockBackend


class MicroVM(Vmm):
    """A microVM running a freestanding ELF guest or a Linux kernel.

    >>> with MicroVM("hello", memory="64M") as vm:
    ...     code = vm.run(timeout=10)
    ...     print(vm.console_output.decode())
    """

    def __init__(self, guest: str | os.PathLike | None = None, *,
                 memory: int | str = "64M", vcpus: int = 1, args: str = "",
                 console: IO[Any] | int | None = None, hugepages: bool = False,
                 memory_backing: str = "memfd", native_devices: bool = True,
                 kernel: str | os.PathLike | bytes | None = None,
                 initrd: str | os.PathLike | bytes | None = None,
                 cmdline: str | None = None, boot: str = "auto",
                 host_profile: "str | HostProfile" = "auto",
                 ports: PortMap | None = None, entry: EntryState | None = None,
                 secondary_vcpus: str | None = None, loader: Loader | None = None,
                 config: VmConfig | None = None, kvm: "Kvm | None" = None) -> None:
        """``guest`` is a freestanding ELF (a path or a bundled name); or
        give ``kernel`` (bzImage or ELF vmlinux), ``initrd`` and ``cmdline``
        to boot Linux; or neither, with a ``loader`` or an ``entry`` state,
        to load a guest of your own. ``host_profile`` ("auto", "pvm",
        "none") shapes CPUID and the command line for the host (see
        hvkit.arch.x86.profiles). ``config`` gives everything at once."""
        if config is None:
            if guest is None and kernel is None and loader is None and entry is None:
                raise ConfigError("nothing to boot: give a guest, a kernel, a loader "
                                  "or an entry state")
            config = VmConfig(guest=guest, kernel=kernel, initrd=initrd, cmdline=cmdline,
                              boot=boot, memory=memory, vcpus=vcpus, args=args,
                              hugepages=hugepages, memory_backing=memory_backing,
                              native_devices=native_devices, host_profile=host_profile,
                              ports=ports if ports is not None else PortMap(),
                              entry=entry, secondary_vcpus=secondary_vcpus)
        elif not isinstance(config, VmConfig):
            raise ConfigError(f"config must be a VmConfig, not {type(config).__name__}")
        Vmm.__init__(self, config, kvm)
        build(config, console=console, loader=loader, into=self)

    # Read-only views kept from the first MicroVM, for scripts that use them.
    @property
    def nr_vcpus(self) -> int:
        return self.config.vcpus

    @property
    def mem_size(self) -> int:
        return self.config.memory

    @property
    def args(self) -> str:
        return self.config.args

    @property
    def kernel(self) -> Any:
        return self.config.kernel

    @property
    def initrd(self) -> Any:
        return self.config.initrd

    def snapshot(self, path: "str | os.PathLike") -> dict[str, float]:
        """Save this paused VM to directory ``path`` (see hvkit.snapshot);
        returns how long its parts took, in seconds."""
        from hvkit.snapshot.vmstate import save
        return save(self, path)

    @classmethod
    def restore(cls, path: "str | os.PathLike", *, memory: str = "cow",
                console: IO[Any] | int | None = None, kvm: "Kvm | None" = None) -> "MicroVM":
        """A VM made from a snapshot, ready to start(): ``memory`` is "cow"
        (no copy; clones share the file), "eager" or "lazy" (userfaultfd)."""
        from hvkit.snapshot.vmstate import restore
        return restore(path, memory=memory, console=console, kvm=kvm, cls=cls)

    def add_nvme(self, disks: "list[BlockBackend]", *, mode: str = "mmio",
                 poll_us: int = 200, slot: int | None = None, **controller_args: Any):
        """Add an NVMe controller with one namespace per disk (BlockBackend).

        ``mode`` picks the doorbell path (see hvkit.platform.nvme): "mmio",
        "ioeventfd" or "shadow". Returns the NvmeController."""
        from hvkit.platform.nvme import NvmeAttachment
        att = NvmeAttachment(disks, mode=mode, poll_us=poll_us, slot=slot, **controller_args)
        self.attach(att)
        return att.ctrl


def run_guest(guest: str, *, timeout: float | None = 30, **kwargs: Any) -> tuple[int | None, bytes]:
    """Boot ``guest`` and return (exit code, console output)."""
    with MicroVM(guest, **kwargs) as vm:
        code = vm.run(timeout)
        return code, vm.console_output
