"""Taking a snapshot of a paused VM, and making a running VM of one.

What is saved: guest RAM; every vCPU's registers, special registers,
XSAVE, XCRs, the MSRs of KVM's save list, debug registers, LAPIC, MP state,
pending events and TSC frequency; the in-kernel PIC pair, IOAPIC and PIT;
kvmclock; the legacy devices (16550, i8042, RTC, the hypercall port's
registrations); and the ``state()`` of every attachment.
"""
from __future__ import annotations

import os
import time
from typing import IO, TYPE_CHECKING, Any

from hvkit.errors import HvkitError
from hvkit.snapshot import cpu
from hvkit.snapshot.format import SnapshotError, memory_path, read_header, write_header
from hvkit.snapshot.memory import check_regions, restore_memory, save_memory
from hvkit.vmm.attach import Attachment

if TYPE_CHECKING:
    from hvkit.kvm.system import Kvm
    from hvkit.vmm.runtime import Vmm

#: the devices the builder makes, saved by name
LEGACY = ("serial", "i8042", "rtc", "hypercalls")


def save(vmm: "Vmm", path: str | os.PathLike) -> dict[str, float]:
    """Write a snapshot of ``vmm`` (paused) into directory ``path``.
    Returns how long each part took, in seconds."""
    from hvkit import __version__
    path = os.fspath(path)
    if vmm.state != "paused":
        raise SnapshotError(f"a snapshot is taken of a paused VM; this one is {vmm.state}")
    if vmm.pci is not None and len(vmm.pci.irqs):
        raise SnapshotError("this VM has PCI devices; their snapshots (NVMe, virtio-pci) "
                            "are not supported yet")
    times: dict[str, float] = {}
    t = time.perf_counter()
    devices = {}
    for name in LEGACY:
        dev = getattr(vmm, name)
        if dev is not None:
            getter = getattr(dev, "state", None)
            if getter is None:
                raise SnapshotError(f"the {name} device cannot save its state")
            devices[name] = getter()
    attachments = {}
    for att in vmm.attachments:
        if att is vmm.hypercalls:
            continue
        try:
            attachments[att.name] = att.state()
        except NotImplementedError as exc:
            raise SnapshotError(f"attachment {att.name!r} cannot be saved: {exc}") from None
    first = vmm.vcpus[0]
    msrs = cpu.readable_msrs(vmm.kvm, first)
    vcpus = [cpu.save_vcpu(v, msrs) for v in vmm.vcpus]
    kvm_vm = vmm.vm
    vm_state = {"pic_master": kvm_vm.get_irqchip(0).hex(), "pic_slave": kvm_vm.get_irqchip(1).hex(),
                "ioapic": kvm_vm.get_irqchip(2).hex(),
                "pit": kvm_vm.get_pit2().hex() if vmm.config.ports.pit else None,
                "clock_ns": _clock(kvm_vm)}
    times["state_s"] = time.perf_counter() - t
    t = time.perf_counter()
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise SnapshotError(f"{path}: cannot make the snapshot directory: {exc.strerror}") from None
    regions = save_memory(vmm.memory, memory_path(path))
    times["memory_s"] = time.perf_counter() - t
    config = _config_dict(vmm.config)
    write_header(path, {
        "hvkit": __version__, "created": time.time(), "config": config,
        "cmdline": vmm.cmdline, "regions": regions,
        "cpuid": cpu.cpuid_to_json(first.get_cpuid2()), "tsc_khz": first.get_tsc_khz(),
        "vcpus": vcpus, "vm": vm_state, "devices": devices, "attachments": attachments,
    })
    return times


def _clock(kvm_vm: Any) -> int | None:
    try:
        return kvm_vm.get_clock()
    except HvkitError:
        return None


def _config_dict(config: Any) -> dict[str, Any]:
    """The config as JSON; images given as bytes and a HostProfile object
    are named, not stored (a restored VM loads no image)."""
    import dataclasses
    blob = (bytes, bytearray, memoryview)
    changes: dict[str, Any] = {}
    if isinstance(config.kernel, blob):
        changes["kernel"] = "<bytes>"
    if isinstance(config.initrd, blob):
        changes["initrd"] = "<bytes>"
    if not isinstance(config.host_profile, str):
        changes["host_profile"] = "none"
    return dataclasses.replace(config, **changes).to_dict() if changes else config.to_dict()


class _Pager(Attachment):
    """Keeps a lazy restore's pager alive exactly as long as the VM."""

    name = "snapshot-pager"

    def __init__(self, pager: Any) -> None:
        self.pager = pager

    def close(self) -> None:
        self.pager.close()


def restore(path: str | os.PathLike, *, memory: str = "cow",
            console: IO[Any] | int | None = None, kvm: "Kvm | None" = None,
            cls: "type[Vmm] | None" = None) -> "Vmm":
    """A new, paused-state VM from a snapshot, ready to ``start()``.

    ``memory``: "cow" (default: the memory file mapped private, nothing
    copied), "eager" (copied into fresh RAM) or "lazy" (pages brought in on
    first touch through userfaultfd). Attachments other than the built-in
    devices are not re-created: attach new ones and give them their saved
    state from ``vm.saved_attachments`` (see ``restore_attachment``).
    ``cls`` is the Vmm subclass to make (``MicroVM.restore`` passes MicroVM)."""
    from hvkit.vmm.builder import build, default_kvm
    from hvkit.vmm.runtime import Vmm
    from hvkit.vmm.config import EntryState, VmConfig
    path = os.fspath(path)
    header = read_header(path)
    mem_file = memory_path(path)
    try:
        size = os.stat(mem_file).st_size
    except OSError as exc:
        raise SnapshotError(f"{mem_file}: cannot read the memory file: {exc.strerror}") from None
    regions = check_regions(header["regions"], size)
    saved_cfg = dict(header["config"])
    vcpus = header["vcpus"]
    if not isinstance(vcpus, list) or len(vcpus) != saved_cfg.get("vcpus"):
        raise SnapshotError(f"{path}: the header's vCPU states do not match its config")
    # The VM is built bare: no guest is loaded, every vCPU gets its saved state.
    config = VmConfig.from_dict({**saved_cfg, "guest": None, "kernel": None, "initrd": None,
                                 "cmdline": None, "args": "", "entry": EntryState().__dict__,
                                 "secondary_vcpus": "wait-sipi",
                                 "memory": sum(r["size"] for r in regions)})
    kvm = kvm or default_kvm()
    saved_cpuid = cpu.cpuid_from_json(header["cpuid"])
    t = time.perf_counter()
    guest_memory = restore_memory(mem_file, regions, memory)
    pager = None
    if memory == "lazy":
        from hvkit.snapshot.uffd import LazyPager
        try:
            pager = LazyPager(guest_memory, mem_file, regions)
        except BaseException:
            guest_memory.close()
            raise
    t_mem = time.perf_counter() - t

    def load_state(vmm: "Vmm") -> None:
        # What a vCPU gets on this host (the builder just set it) must hold
        # every feature the saved guest was shown.
        lost = cpu.missing_features(saved_cpuid, vmm.vcpus[0].get_cpuid2())
        if lost:
            raise SnapshotError(f"{path}: this host's CPU lacks features the guest was "
                                "shown: " + ", ".join(lost))
        for vcpu, state in zip(vmm.vcpus, vcpus):
            cpu.load_vcpu(vcpu, state, saved_cpuid)
        _load_vm(vmm, header["vm"], tsc_restored=cpu.tsc_took(vmm.vcpus[0], vcpus[0]))
        for name, state in header.get("devices", {}).items():
            dev = getattr(vmm, name, None) if name in LEGACY else None
            if dev is None:
                raise SnapshotError(f"{path}: saved device {name!r} is not in the restored VM")
            if name == "hypercalls":
                # handlers come back with their owners; checked at start()
                dev.calls = int(state.get("calls", 0))
            else:
                dev.restore(state)
        vmm.cmdline = header.get("cmdline")

    cls = cls or Vmm
    vm = cls.__new__(cls)
    Vmm.__init__(vm, config, kvm)
    build(config, console=console, into=vm, guest_memory=guest_memory, restore=load_state)
    if pager is not None:
        vm.attach(_Pager(pager))
    vm.timings["restore_memory"] = t_mem
    vm.saved_attachments = dict(header.get("attachments", {}))
    vm.snapshot_header = {k: header[k] for k in ("hvkit", "created", "tsc_khz") if k in header}
    _check_hypercalls_before_start(vm, header.get("devices", {}).get("hypercalls"))
    return vm


def _load_vm(vmm: "Vmm", state: dict[str, Any], tsc_restored: bool = True) -> None:
    """The irqchip, PIT and kvmclock. kvmclock goes back to its saved value
    only where the guest's TSC did too: on a host that ignores TSC writes
    (nested PVM) the TSC has moved on, and a kvmclock held back would
    disagree with it for as long as the snapshot is old."""
    kvm_vm = vmm.vm
    try:
        for key in ("pic_master", "pic_slave", "ioapic"):
            kvm_vm.set_irqchip(bytes.fromhex(state[key]))
        if state.get("pit") and vmm.config.ports.pit:
            kvm_vm.set_pit2(bytes.fromhex(state["pit"]))
        if state.get("clock_ns") is not None and tsc_restored:
            kvm_vm.set_clock(int(state["clock_ns"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise SnapshotError(f"saved VM state is damaged: {exc}") from None


def _check_hypercalls_before_start(vm: "Vmm", saved: dict | None) -> None:
    """The guest may call any hypercall it could call when it was saved:
    starting without a handler for one of them is refused by name."""
    if not saved or vm.hypercalls is None:
        return
    names = dict(saved.get("handlers", {}))

    def check(vmm: Any) -> None:
        have = {f"{nr:#x}" for nr in vmm.hypercalls.handlers}
        missing = sorted(set(names) - have)
        if missing:
            raise SnapshotError("the snapshot's guest uses hypercalls with no handler now: "
                                + ", ".join(f"{k} ({names[k]})" for k in missing)
                                + "; register them before start()")
    vm.before_start.append(check)


def restore_attachment(vm: "Vmm", attachment: Attachment) -> Attachment:
    """Attach a new instance of a saved attachment and give it its state."""
    saved = getattr(vm, "saved_attachments", {})
    if attachment.name not in saved:
        raise SnapshotError(f"the snapshot has no state for attachment {attachment.name!r}")
    vm.attach(attachment)
    attachment.restore(saved[attachment.name])
    return attachment
