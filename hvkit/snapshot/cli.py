"""`hvkit snapshot create|restore|info`: snapshots from the command line.

    hvkit snapshot create snap/ echo --at "echo ready"       # boot, wait, save
    hvkit snapshot create snap/ --kernel vmlinux --initrd i.cpio --at HVKIT-INIT-OK
    hvkit snapshot restore snap/ --input --memory lazy       # continue it
    hvkit snapshot info snap/ [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

from hvkit.errors import GuestTimeout, HvkitError
from hvkit.vmargs import add_vm_arguments, timeout_arg, vm_config


def add_snapshot_commands(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    snap = subparsers.add_parser("snapshot", help="save, restore and inspect VM snapshots")
    sub = snap.add_subparsers(dest="snapshot_command", metavar="COMMAND", required=True)

    p = sub.add_parser("create", help="boot a VM, wait for a console line, save it",
                       description="Boot a VM (the options of 'hvkit run'), wait until TEXT "
                                   "appears on its console, pause it and save a snapshot.")
    p.add_argument("path", help="snapshot directory to write")
    add_vm_arguments(p)
    p.add_argument("--at", required=True, metavar="TEXT",
                   help="save when this text appears on the console")
    p.set_defaults(func=cmd_create)

    p = sub.add_parser("restore", help="run a VM from a snapshot, streaming its console",
                       description="Restore a snapshot and run it to its end; exits with the "
                                   "guest's code as 'hvkit run' does.")
    p.add_argument("path", help="snapshot directory")
    p.add_argument("--memory", choices=("cow", "eager", "lazy"), default="cow",
                   help="how guest RAM comes back (default cow: the file mapped private)")
    p.add_argument("--input", "-i", action="store_true", help="forward stdin to the console")
    p.add_argument("--timeout", "-t", type=timeout_arg, default=None,
                   help="stop after S seconds (0 or none: no limit)")
    p.add_argument("--device", action="append", default=[], metavar="NAME:KEY=VALUE",
                   type=device_change,
                   help="make a saved device with another setting, e.g. "
                        "virtio-blk0:backend=copy.img or virtio-vsock0:uds_path=/run/v.sock "
                        "(repeatable; 'hvkit snapshot info' lists the devices)")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("info", help="what a snapshot holds")
    p.add_argument("path", help="snapshot directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)
    return snap


def cmd_create(args: argparse.Namespace) -> int:
    from hvkit.machine import MicroVM
    config = vm_config(args)
    marker = args.at.encode()
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    with MicroVM(config=config) as vm:
        vm.start()
        while marker not in vm.console_output:
            if vm.finished.is_set():
                raise HvkitError(f"the guest stopped ({vm.exit_reason}) before printing "
                                 f"{args.at!r}")
            if deadline is not None and time.monotonic() > deadline:
                raise GuestTimeout(f"{args.at!r} did not appear within {args.timeout:g} s")
            time.sleep(0.01)
        vm.pause()
        times = vm.snapshot(args.path)
    st = os.stat(os.path.join(args.path, "memory"))
    print(f"saved {args.path}: {st.st_size >> 20} MiB of RAM ({st.st_blocks * 512 >> 20} MiB "
          f"on disk) in {sum(times.values()) * 1e3:.1f} ms")
    return 0


def _forward(vm) -> None:
    fd = sys.stdin.fileno()
    while True:
        try:
            data = os.read(fd, 4096)
            if not data:
                return
            vm.send_input(data)
        except (OSError, HvkitError):
            return


def device_change(text: str) -> tuple[str, str, str]:
    """NAME:KEY=VALUE, for --device."""
    name, sep, rest = text.partition(":")
    key, eq, value = rest.partition("=")
    if not (sep and eq and name and key):
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME:KEY=VALUE "
                                         "(e.g. virtio-blk0:backend=copy.img)")
    return name, key, value


def cmd_restore(args: argparse.Namespace) -> int:
    from hvkit.machine import MicroVM
    devices: dict[str, dict[str, str]] = {}
    for name, key, value in args.device:
        devices.setdefault(name, {})[key] = value
    with MicroVM.restore(args.path, memory=args.memory, console=sys.stdout,
                         devices=devices) as vm:
        vm.start()
        if args.input:
            threading.Thread(target=_forward, args=(vm,), daemon=True).start()
        try:
            code = vm.wait(args.timeout)
        finally:
            sys.stdout.flush()
        return (code or 0) & 0xFF


def cmd_info(args: argparse.Namespace) -> int:
    from hvkit.snapshot.format import memory_path, read_header
    h = read_header(args.path)
    try:
        st = os.stat(memory_path(args.path))
        size, used = st.st_size, st.st_blocks * 512
    except OSError as exc:
        raise HvkitError(f"{memory_path(args.path)}: {exc.strerror}") from None
    cfg = h["config"]
    info = {"path": args.path, "format_version": h["version"], "hvkit": h.get("hvkit"),
            "created": h.get("created"), "guest": cfg.get("guest") or cfg.get("kernel"),
            "vcpus": len(h["vcpus"]), "memory_bytes": size, "memory_on_disk": used,
            "cmdline": h.get("cmdline"), "tsc_khz": h.get("tsc_khz"),
            "devices": sorted(h.get("devices", {})),
            "attachments": sorted(h.get("attachments", {})),
            "id": h.get("id"), "parent": h.get("parent"),
            "diff_pages": (sum(c for runs in h["pages"] for _, c in runs)
                           if h.get("pages") else None),
            "made_again_on_restore": {name: spec.get("args", {})
                                      for name, spec in h.get("attachment_specs") or []}}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["created"] or 0))
    print(f"{args.path}: hvkit snapshot v{info['format_version']} (hvkit {info['hvkit']}, "
          f"{when})")
    print(f"  guest {info['guest']}, {info['vcpus']} vCPU, {size >> 20} MiB RAM "
          f"({used >> 20} MiB on disk), TSC {info['tsc_khz']} kHz")
    if info["parent"]:
        print(f"  a diff of {info['parent']['path']}: {info['diff_pages']} pages")
    if info["cmdline"]:
        print(f"  command line: {info['cmdline']}")
    for name, made in info["made_again_on_restore"].items():
        print(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in made.items()
                                         if v not in (None, "")))
    print(f"  devices: {', '.join(info['devices']) or 'none'}; attachments: "
          f"{', '.join(info['attachments']) or 'none'}")
    return 0
