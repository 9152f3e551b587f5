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
from hvkit.snapshot.pages import runs_of
from hvkit.vmm.attach import Attachment

if TYPE_CHECKING:
    from hvkit.kvm.system import Kvm
    from hvkit.snapshot.pages import PageProvider
    from hvkit.vmm.runtime import Vmm

#: the devices the builder makes, saved by name
LEGACY = ("serial", "i8042", "rtc", "hypercalls")


def save(vmm: "Vmm", path: str | os.PathLike, *, diff: bool = False,
         track_dirty: bool = False) -> dict[str, float]:
    """Write a snapshot of ``vmm`` (paused) into directory ``path``.

    ``diff=True`` writes only the pages written since this VM's last
    snapshot (or the snapshot it was restored from), which needs dirty
    tracking since then: ``track_dirty=True`` on that snapshot or restore.
    ``track_dirty=True`` keeps tracking after this snapshot, so the next
    one can be a diff on it. Returns how long each part took, in seconds."""
    import uuid

    from hvkit import __version__
    from hvkit.snapshot.tracking import DirtyTracker, tracker_of
    path = os.fspath(path)
    if vmm.state != "paused":
        raise SnapshotError(f"a snapshot is taken of a paused VM; this one is {vmm.state}")
    tracker = tracker_of(vmm)
    base = tracker.parent if tracker is not None else None
    if diff and base is None:
        raise SnapshotError("a diff snapshot needs dirty-page tracking since the VM's last "
                            "snapshot: take that one (or restore) with track_dirty=True")
    if diff and not os.path.isdir(base["path"]):
        raise SnapshotError(f"the diff's parent snapshot {base['path']} is gone")
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
    specs = []
    for att in vmm.attachments:
        if att is vmm.hypercalls or att.transient:
            continue
        try:
            attachments[att.name] = att.state()
        except NotImplementedError as exc:
            raise SnapshotError(f"attachment {att.name!r} cannot be saved: {exc}") from None
        spec = getattr(att, "spec", None)
        if spec is not None:
            specs.append([att.name, spec])
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
    written = tracker.collect() if tracker is not None else None
    parent = None
    pages = None
    snap_id = uuid.uuid4().hex
    try:
        if diff and base is not None and written is not None:
            pages = [runs_of(p) for p in written]
            regions = save_memory(vmm.memory, memory_path(path), pages=pages)
            # relative, so a chain of snapshot directories can move together
            parent = {"path": os.path.relpath(base["path"], os.path.abspath(path)),
                      "id": base["id"]}
        else:
            regions = save_memory(vmm.memory, memory_path(path))
        times["memory_s"] = time.perf_counter() - t
        write_header(path, {
            "hvkit": __version__, "created": time.time(), "id": snap_id, "parent": parent,
            "pages": pages, "config": _config_dict(vmm.config),
            "cmdline": vmm.cmdline, "regions": regions,
            "cpuid": cpu.cpuid_to_json(first.get_cpuid2()), "tsc_khz": first.get_tsc_khz(),
            "vcpus": vcpus, "vm": vm_state, "devices": devices, "attachments": attachments,
            "attachment_specs": specs,
        })
    except BaseException as exc:
        if tracker is not None and written is not None:
            tracker.give_back(written)    # the next diff is still on the old parent
        if isinstance(exc, OSError):
            raise SnapshotError(f"{path}: cannot write the snapshot: "
                                f"{exc.strerror or exc}") from None
        raise
    if track_dirty and tracker is None:
        tracker = DirtyTracker()
        vmm.attach(tracker)
    if tracker is not None:
        tracker.parent = {"path": os.path.abspath(path), "id": snap_id}
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
    """Keeps a lazy restore's pager alive exactly as long as the VM, and
    leaves the blocks this run touched for the next lazy restore."""

    name = "snapshot-pager"
    transient = True

    def __init__(self, pager: Any, record: str | None) -> None:
        self.pager = pager
        self.record = record

    def close(self) -> None:
        touched = list(dict.fromkeys(self.pager.touched))
        self.pager.close()
        if self.record and touched:
            save_working_set(self.record, self.pager.block, touched)


MAX_CHAIN = 64


def snapshot_chain(path: str) -> list[tuple[str, dict[str, Any]]]:
    """The full snapshot and the diffs up to ``path``, oldest first, each as
    (directory, header); parents are checked by id."""
    chain = [(path, read_header(path))]
    while chain[-1][1].get("parent"):
        where, header = chain[-1]
        parent = header["parent"]
        try:
            ppath = os.path.normpath(os.path.join(where, str(parent["path"])))
            pid = str(parent["id"])
        except (TypeError, KeyError) as exc:
            raise SnapshotError(f"{where}: the diff's parent entry is damaged: {exc}") from None
        if len(chain) >= MAX_CHAIN:
            raise SnapshotError(f"{path}: a chain of more than {MAX_CHAIN} diff snapshots")
        try:
            pheader = read_header(ppath)
        except SnapshotError as exc:
            raise SnapshotError(f"{where}: its parent snapshot cannot be read: {exc}") from None
        if pheader.get("id") != pid:
            raise SnapshotError(f"{where}: its parent {ppath} is another snapshot "
                                f"(id {pheader.get('id')}, expected {pid})")
        chain.append((ppath, pheader))
    chain.reverse()
    return chain


#: parsed snapshot chains by path, for clones restored from one snapshot
#: again and again: (the stat of every header in the chain, chain, CPUID)
_chains: dict[str, tuple[list[tuple[int, int, int]], list, list]] = {}


def _header_stat(path: str) -> tuple[int, int, int]:
    from hvkit.snapshot.format import HEADER
    try:
        st = os.stat(os.path.join(path, HEADER))
    except OSError:
        return (0, 0, 0)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _read_chain(path: str) -> tuple[list[tuple[str, dict[str, Any]]], list]:
    """snapshot_chain() and the saved CPUID, parsed once per snapshot (a
    header that changed on disk is read again)."""
    key = os.path.abspath(path)
    hit = _chains.get(key)
    if hit is not None and hit[0] == [_header_stat(where) for where, _ in hit[1]]:
        return hit[1], hit[2]
    chain = snapshot_chain(path)
    cpuid = cpu.cpuid_from_json(chain[-1][1]["cpuid"])
    if len(_chains) > 64:
        _chains.clear()
    _chains[key] = ([_header_stat(where) for where, _ in chain], chain, cpuid)
    return chain, cpuid


def save_working_set(path: str, block: int, blocks: list[tuple[int, int]]) -> None:
    """The blocks a lazy run touched, for the next lazy restore to prefetch
    (best effort: a snapshot directory the user cannot write keeps none)."""
    import json

    from hvkit.files import atomic_write
    from hvkit.snapshot.format import working_set_path
    try:
        with atomic_write(working_set_path(path), "working set", error=SnapshotError) as f:
            f.write(json.dumps({"block": block, "blocks": blocks}).encode())
    except (SnapshotError, OSError):
        pass


def load_working_set(path: str, block: int) -> list[tuple[int, int]]:
    import json

    from hvkit.snapshot.format import working_set_path
    try:
        with open(working_set_path(path), "rb") as f:
            data = json.loads(f.read(16 << 20))
        if data.get("block") != block:
            return []
        return [(int(r), int(o)) for r, o in data["blocks"]]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return []           # no working set, or not one this pager can use


def restore(path: str | os.PathLike, *, memory: str = "cow",
            console: IO[Any] | int | None = None, kvm: "Kvm | None" = None,
            cls: "type[Vmm] | None" = None, pages: "PageProvider | None" = None,
            prefetch: bool = True, track_dirty: bool = False,
            devices: "dict[str, dict[str, Any]] | None" = None) -> "Vmm":
    """A new, paused-state VM from a snapshot (full or diff), ready to
    ``start()``.

    ``memory``: "cow" (default: the memory file mapped private, nothing
    copied), "eager" (copied into fresh RAM) or "lazy" (pages brought in on
    first touch through userfaultfd, from ``pages`` if given, else from the
    snapshot's files; with ``prefetch`` the blocks the last lazy run touched
    come in first, and this run's are recorded for the next).
    ``track_dirty``: track written pages from here, so this VM's next
    snapshot can be a diff on this one. Devices that the VM class knows how
    to make again (MicroVM's ``add_virtio_*``: the snapshot keeps how they
    were made) come back connected to their host resources; ``devices``
    changes what they are made with, by attachment name (e.g.
    ``{"virtio-blk0": {"backend": "copy.img"}}``). Other attachments are
    not re-created: attach new ones and give them their saved state from
    ``vm.saved_attachments`` (see ``restore_attachment``).
    ``cls`` is the Vmm subclass to make (``MicroVM.restore`` passes MicroVM)."""
    from hvkit.snapshot.pages import ChainProvider, DiffLayer, FileProvider, check_runs
    from hvkit.vmm.builder import build, default_kvm
    from hvkit.vmm.runtime import Vmm
    from hvkit.vmm.config import EntryState, VmConfig
    path = os.fspath(path)
    if pages is not None and memory != "lazy":
        raise SnapshotError("a page provider serves a lazy restore: use memory='lazy'")
    chain, saved_cpuid = _read_chain(path)
    header = chain[-1][1]
    if track_dirty and not header.get("id"):
        raise SnapshotError(f"{path}: a version-1 snapshot has no id, so no diff can "
                            "name it as its parent")
    files: list[str] = []
    tables = []
    for where, h in chain:
        mem_file = memory_path(where)
        try:
            size = os.stat(mem_file).st_size
        except OSError as exc:
            raise SnapshotError(f"{mem_file}: cannot read the memory file: "
                                f"{exc.strerror}") from None
        files.append(mem_file)
        tables.append(check_regions(h["regions"], size))
    regions = tables[0]
    if any([(r["gpa"], r["size"]) for r in t] != [(r["gpa"], r["size"]) for r in regions]
           for t in tables):
        raise SnapshotError(f"{path}: the diff snapshots' RAM layout differs from their base's")
    diffs = []
    for (where, h), mem_file, table in zip(chain[1:], files[1:], tables[1:]):
        runs = h.get("pages")
        if not isinstance(runs, list) or len(runs) != len(table):
            raise SnapshotError(f"{where}: a diff snapshot without a page list per region")
        diffs.append((mem_file, table, [check_runs(rr, r["size"] // 4096, where)
                                        for rr, r in zip(runs, table)]))
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
    t = time.perf_counter()
    guest_memory = restore_memory(files[0], regions, memory,
                                  [(f, runs) for f, _, runs in diffs])
    pager = None
    if memory == "lazy":
        from hvkit.snapshot.uffd import LazyPager
        try:
            if pages is None:
                pages = ChainProvider(FileProvider(files[0], regions),
                                      [DiffLayer(f, table, runs) for f, table, runs in diffs])
            block = 64 << 10
            pager = LazyPager(guest_memory, pages, block=block,
                              prefetch=load_working_set(path, block) if prefetch else ())
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
        vm.attach(_Pager(pager, path if prefetch else None))
    try:
        _recreate_attachments(vm, path, header, devices or {})
    except BaseException:
        vm.close()
        raise
    if track_dirty:
        from hvkit.snapshot.tracking import DirtyTracker
        vm.attach(DirtyTracker({"path": os.path.abspath(path), "id": str(header.get("id"))}))
    vm.timings["restore_memory"] = t_mem
    vm.saved_attachments = dict(header.get("attachments", {}))
    vm.snapshot_header = {k: header[k] for k in ("hvkit", "created", "tsc_khz") if k in header}
    _check_hypercalls_before_start(vm, header.get("devices", {}).get("hypercalls"))
    return vm


def _recreate_attachments(vm: "Vmm", path: str, header: dict[str, Any],
                          overrides: dict[str, dict[str, Any]]) -> None:
    """Make the saved devices again (same placement, host resources
    reopened, ``overrides`` applied) and give each its saved state."""
    specs = header.get("attachment_specs") or []
    saved = header.get("attachments", {})
    names = {str(name) for name, _ in specs}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise SnapshotError(f"{path}: no saved device named {', '.join(unknown)} to change "
                            f"(saved devices: {', '.join(sorted(names)) or 'none'})")
    recreate = getattr(vm, "recreate_attachment", None)
    if specs and recreate is None:
        return               # a bare Vmm: the caller re-attaches (restore_attachment)
    for name, spec in specs:
        change = overrides.get(name, {})
        if not isinstance(change, dict):
            raise SnapshotError(f"the changes for {name} must be a dict, not {change!r}")
        try:
            att = recreate(str(name), spec, change)
            att.restore(saved.get(name, {}))
        except SnapshotError:
            raise
        except (HvkitError, OSError, KeyError, TypeError, ValueError) as exc:
            raise SnapshotError(f"{path}: device {name} cannot be made again: {exc}") from None


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
