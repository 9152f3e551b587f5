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
from hvkit.vmm.attach import Attachment
from hvkit.vmm.runtime import Vmm

if TYPE_CHECKING:
    from hvkit.arch.x86.profiles import HostProfile
    from hvkit.kvm.system import Kvm
    from hvkit.storage.backend import BlockBackend
    from hvkit.snapshot.pages import PageProvider


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

    def snapshot(self, path: "str | os.PathLike", *, diff: bool = False,
                 track_dirty: bool = False) -> dict[str, float]:
        """Save this paused VM to directory ``path`` (see hvkit.snapshot);
        returns how long its parts took, in seconds. ``diff=True`` saves
        only the pages written since the last snapshot (taken, or restored
        from, with ``track_dirty=True``)."""
        from hvkit.snapshot.vmstate import save
        return save(self, path, diff=diff, track_dirty=track_dirty)

    @classmethod
    def restore(cls, path: "str | os.PathLike", *, memory: str = "cow",
                console: IO[Any] | int | None = None, kvm: "Kvm | None" = None,
                pages: "PageProvider | None" = None, prefetch: bool = True,
                track_dirty: bool = False,
                devices: "dict[str, dict[str, Any]] | None" = None) -> "MicroVM":
        """A VM made from a snapshot (a full one, or the last of a chain of
        diffs), ready to start(): ``memory`` is "cow" (no copy; clones
        share the file), "eager" or "lazy" (userfaultfd, from ``pages`` if
        given; ``prefetch`` brings in first what the last lazy run touched).
        ``track_dirty`` lets this VM's next snapshot be a diff on this one.
        Its virtio devices come back on their disks, sockets and taps;
        ``devices`` changes what they are made with, by name (``{"virtio-blk0":
        {"backend": "copy.img"}, "virtio-vsock0": {"uds_path": ...}}``)."""
        from hvkit.snapshot.vmstate import restore
        return restore(path, memory=memory, console=console, kvm=kvm, cls=cls, pages=pages,
                       prefetch=prefetch, track_dirty=track_dirty, devices=devices)

    def clone(self, n: int, *, memory: str = "cow", dir: "str | None" = None,
              consoles: "list[IO[Any] | int | None] | None" = None) -> "list[MicroVM]":
        """``n`` independent copies of this paused VM, each ready to start().

        A snapshot goes to a temporary directory (in ``dir``, default the
        system's), every clone is restored from it, and the directory is
        removed: "cow" clones keep sharing the memory file's pages until
        they write them."""
        import shutil
        import tempfile

        from hvkit.errors import ConfigError
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"clone count must be a positive integer, not {n!r}")
        if consoles is not None and len(consoles) != n:
            raise ConfigError(f"{len(consoles)} consoles for {n} clones")
        where = tempfile.mkdtemp(prefix="hvkit-clone-", dir=dir)
        clones: list[MicroVM] = []
        try:
            self.snapshot(where)
            for i in range(n):
                clones.append(type(self).restore(where, memory=memory, kvm=self.kvm,
                                                 console=consoles[i] if consoles else None,
                                                 prefetch=False))
        except BaseException:
            for vm in clones:
                vm.close()
            raise
        finally:
            shutil.rmtree(where, ignore_errors=True)
        return clones

    def add_nvme(self, disks: "list[BlockBackend]", *, mode: str = "mmio",
                 poll_us: int = 200, slot: int | None = None, **controller_args: Any):
        """Add an NVMe controller with one namespace per disk (BlockBackend).

        ``mode`` picks the doorbell path (see hvkit.platform.nvme): "mmio",
        "ioeventfd" or "shadow". Returns the NvmeController."""
        from hvkit.platform.nvme import NvmeAttachment
        from hvkit.storage.raw import RawFileBackend
        att = NvmeAttachment(disks, mode=mode, poll_us=poll_us, slot=slot, **controller_args)
        att.name = f"nvme{sum(isinstance(a, NvmeAttachment) for a in self.attachments)}"
        self.attach(att)
        # how it was made, for a restore to make it again: raw files by path
        paths = [[os.path.abspath(d.path), d.read_only] if type(d) is RawFileBackend else None
                 for d in disks]
        att.spec = {"add": "nvme", "args": {"disks": paths, "mode": mode, "poll_us": poll_us,
                                            "slot": att.devfn >> 3, **controller_args}}
        return att.ctrl

    # -- virtio ----------------------------------------------------------------
    def _add_virtio(self, device: Any, transport: str, slot: int | None,
                    args: dict[str, Any]) -> Any:
        from hvkit.platform.virtio import VirtioAttachment
        try:
            att = VirtioAttachment(device, transport, slot)
        except BaseException:
            device.close()
            raise
        # A stable name (the kind and its count) and how it was made: what
        # a snapshot keeps so that a restore makes it again.
        kind = f"virtio-{device.name}"
        att.name = f"{kind}{sum(a.name.startswith(kind) for a in self.attachments)}"
        self.attach(att)                  # on failure the attachment closes the device
        placed = att.devfn >> 3 if transport == "pci" else att.mmio_index
        att.spec = {"add": f"virtio_{device.name}",
                    "args": {**args, "transport": transport, "slot": placed}}
        return device

    def recreate_attachment(self, name: str, spec: dict[str, Any],
                            change: dict[str, Any]) -> Any:
        """Make a saved device again from its snapshot ``spec`` with
        ``change`` applied (MicroVM.restore's ``devices``); returns the
        attachment, which then takes its saved state."""
        add = spec.get("add") if isinstance(spec, dict) else None
        if add not in ("virtio_blk", "virtio_rng", "virtio_console", "virtio_vsock",
                       "virtio_net", "nvme"):
            raise ConfigError(f"{name}: this hvkit cannot make a {add!r} device")
        args = {**spec.get("args", {}), **change}
        if add == "nvme":
            args["disks"] = _nvme_disks(name, args.get("disks"))
            # the files opened here are this VM's: closed after the controller
            self.attach(_ClosesWithVm(f"{name}-disks", args["disks"]))
        if add == "virtio_blk" and args.get("backend") is None:
            raise ConfigError(f"{name} was made on a BlockBackend object, not a path: give "
                              f"MicroVM.restore(..., devices={{{name!r}: {{'backend': ...}}}})")
        getattr(self, f"add_{add}")(**args)
        att = self.attachments[-1]
        if att.name != name:
            raise ConfigError(f"{name} came back as {att.name}: the saved devices are "
                              "out of order")
        return att

    def add_virtio_blk(self, backend: "BlockBackend | str | os.PathLike", *,
                       transport: str = "pci", read_only: bool | None = None,
                       serial: str = "", slot: int | None = None):
        """Add a virtio-blk disk: a BlockBackend, or the path of a raw image
        (opened here, O_DIRECT where the file system allows; the VM closes
        it). ``transport`` is "pci" or "mmio". Returns the VirtioBlk."""
        from hvkit.devices.virtio.blk import VirtioBlk, default_serial
        from hvkit.storage.backend import BlockBackend
        owned = None
        path_arg = None
        if not isinstance(backend, BlockBackend):
            if not isinstance(backend, (str, os.PathLike)):
                raise ConfigError(f"virtio-blk: {backend!r} is neither a BlockBackend nor a path")
            path = path_arg = os.fspath(backend)
            if not os.path.isfile(path):
                raise ConfigError(f"virtio-blk: disk image {path!r} does not exist "
                                  f"or is not a file")
            from hvkit.storage.raw import RawFileBackend
            try:
                owned = backend = RawFileBackend(path, read_only=bool(read_only))
            except OSError as exc:
                raise ConfigError(f"virtio-blk: {exc}") from None
            serial = serial or default_serial(path)
        try:
            device = VirtioBlk(self.memory, backend, serial=serial, read_only=read_only,
                               close_backend=owned is not None)
        except BaseException:
            if owned is not None:
                owned.close()
            raise
        return self._add_virtio(device, transport, slot,
                                {"backend": path_arg and os.path.abspath(path_arg),
                                 "read_only": read_only, "serial": serial})

    def add_virtio_rng(self, *, transport: str = "pci", slot: int | None = None):
        """Add a virtio-rng fed by the host's getrandom(2). Returns the VirtioRng."""
        from hvkit.devices.virtio.rng import VirtioRng
        return self._add_virtio(VirtioRng(self.memory), transport, slot, {})

    def add_virtio_console(self, *, transport: str = "pci", slot: int | None = None,
                           sink: Any = None, feed_fd: int | None = None):
        """Add a virtio-console: the guest's output goes to ``sink(bytes)``
        (or is kept in ``.output``), ``send_input()`` or ``feed_fd`` types
        into it. Returns the VirtioConsole."""
        from hvkit.devices.virtio.console import VirtioConsole
        return self._add_virtio(VirtioConsole(self.memory, sink=sink, feed_fd=feed_fd),
                                transport, slot, {})

    def add_virtio_vsock(self, guest_cid: int, uds_path: "str | os.PathLike", *,
                         transport: str = "pci", slot: int | None = None):
        """Add a virtio-vsock with Firecracker's host side: the guest's
        connections to port P reach ``<uds_path>_P``; host processes connect
        to ``uds_path`` and write ``CONNECT P\\n``. Returns the VirtioVsock."""
        from hvkit.devices.virtio.vsock import VirtioVsock
        return self._add_virtio(VirtioVsock(self.memory, guest_cid, uds_path), transport, slot,
                                {"guest_cid": guest_cid,
                                 "uds_path": os.path.abspath(os.fspath(uds_path))})

    def add_virtio_net(self, tap: Any = None, *, transport: str = "pci",
                       slot: int | None = None, mac: str | None = None,
                       mtu: int | None = None, bridge: str | None = None,
                       netns: str | None = None, offloads: bool = True):
        """Add a virtio-net on a tap: None creates one with a free name, a
        string creates one with that name (an existing interface is refused),
        a ``hvkit.net.tap.Tap`` is used as is. A tap made here is removed
        when the VM closes. Returns the VirtioNet (its ``backend`` is the tap)."""
        from hvkit.devices.virtio.net import VirtioNet
        from hvkit.net.tap import Tap
        named = tap if isinstance(tap, str) else None
        if tap is None or isinstance(tap, str):
            tap = Tap.create(tap, mtu=mtu, bridge=bridge, netns=netns)
            close_backend = True
        elif hasattr(tap, "fd") and hasattr(tap, "set_offload"):
            close_backend = False
        else:
            raise ConfigError(f"virtio-net: tap {tap!r} is not a name or a Tap")
        try:
            device = VirtioNet(self.memory, tap, mac=mac, mtu=mtu, offloads=offloads,
                               close_backend=close_backend)
        except BaseException:
            if close_backend:
                tap.close()
            raise
        return self._add_virtio(device, transport, slot,
                                {"tap": named, "mac": device.mac.hex(":"), "mtu": mtu,
                                 "bridge": bridge, "netns": netns, "offloads": offloads})


class _ClosesWithVm(Attachment):
    """Closes what a restore opened for a device, when the VM closes."""

    transient = True

    def __init__(self, name: str, items: list[Any]) -> None:
        self.name = name
        self.items = items

    def close(self) -> None:
        for item in self.items:
            item.close()


def _nvme_disks(name: str, disks: Any) -> "list[BlockBackend]":
    """An NVMe controller's saved disks opened again: raw files by path
    (``[path, read_only]`` or a path); a disk that was a BlockBackend
    object must be given again."""
    from hvkit.storage.backend import BlockBackend
    from hvkit.storage.raw import RawFileBackend
    if not isinstance(disks, list):
        raise ConfigError(f"{name}: saved disks are damaged: {disks!r}")
    out: list[BlockBackend] = []
    opened: list[BlockBackend] = []
    try:
        for i, d in enumerate(disks):
            if isinstance(d, BlockBackend):
                out.append(d)
                continue
            if isinstance(d, (str, os.PathLike)):
                d = [d, False]
            if not (isinstance(d, list) and len(d) == 2):
                raise ConfigError(f"{name}: disk {i} was a BlockBackend object, not a file: "
                                  f"give MicroVM.restore(..., devices={{{name!r}: "
                                  "{'disks': [...]}})")
            opened.append(RawFileBackend(d[0], read_only=bool(d[1])))
            out.append(opened[-1])
    except BaseException:
        for d in opened:
            d.close()
        raise
    return out


def run_guest(guest: str, *, timeout: float | None = 30, **kwargs: Any) -> tuple[int | None, bytes]:
    """Boot ``guest`` and return (exit code, console output)."""
    with MicroVM(guest, **kwargs) as vm:
        code = vm.run(timeout)
        return code, vm.console_output
