"""The ``hvkit`` command."""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from typing import Sequence

from hvkit import __version__
from hvkit.errors import GuestCrash, GuestTimeout, HvkitError


def _forward_stdin(vm) -> None:
    fd = sys.stdin.fileno()
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:
            return
        if not data:
            return
        vm.send_input(data)


def cmd_run(args: argparse.Namespace) -> int:
    from hvkit.machine import MicroVM
    if args.verbose:
        print(f"hvkit: booting {args.guest} ({args.memory}, {args.vcpus} vCPU)", file=sys.stderr)
    with MicroVM(args.guest, memory=args.memory, vcpus=args.vcpus, args=args.args or "",
                 console=sys.stdout) as vm:
        vm.start()
        if args.input:
            threading.Thread(target=_forward_stdin, args=(vm,), daemon=True).start()
        try:
            code = vm.wait(args.timeout)
        finally:
            sys.stdout.flush()
        if args.verbose:
            print(f"hvkit: guest exited with code {code} ({vm.exit_reason}); "
                  f"exits: {vm.exit_counts()}", file=sys.stderr)
        return code & 0xFF


def cmd_info(args: argparse.Namespace) -> int:
    from hvkit.host import CAPS, probe
    info = probe(args.kvm)
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
        return 0 if info.kvm_usable else 1
    print(f"hvkit {__version__}")
    print(f"KVM: {info.kvm_path}: " + ("usable" if info.kvm_usable else f"NOT usable: {info.reason}"))
    if info.kvm_usable:
        print(f"  API version {info.api_version}, flavor {info.kvm_flavor}"
              + (" (nested, PVM-based: kernel-mode guest code is emulated)"
                 if info.kvm_flavor == "pvm" else ""))
        print(f"  TSC: {info.tsc_khz} kHz")
        print("  capabilities:")
        for name, what in CAPS.items():
            print(f"    {name:28} {info.capabilities.get(name, 0):>6}  {what}")
    print(f"KSM: {'available' if info.ksm_available else 'absent'}"
          + (", writable" if info.ksm_writable else (", read-only" if info.ksm_available else "")))
    print(f"Huge pages: {info.hugepages_total} reserved; THP {info.thp or 'n/a'}")
    print("hvkit features on this host:")
    for name, ok in info.features.items():
        print(f"    {name:28} {'yes' if ok else 'no'}")
    return 0 if info.kvm_usable else 1


def cmd_guests(args: argparse.Namespace) -> int:
    from hvkit import guests
    for name in guests.available():
        print(f"{name:10} {guests.path(name)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hvkit", description="A userspace hypervisor toolkit on Linux KVM.")
    p.add_argument("--version", action="version", version=f"hvkit {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser("run", help="boot a guest and stream its console",
                         description="Boot a freestanding ELF guest (a path, or the name of a "
                                     "bundled guest such as 'hello'); exits with the guest's code.")
    run.add_argument("guest", help="guest ELF path or bundled guest name")
    run.add_argument("--memory", "-m", default="64M", help="guest RAM (default 64M)")
    run.add_argument("--vcpus", "-c", type=int, default=1, help="number of vCPUs (default 1)")
    run.add_argument("--timeout", "-t", type=float, default=None, help="stop after S seconds")
    run.add_argument("--args", "-a", default="", help="argument string passed to the guest")
    run.add_argument("--input", "-i", action="store_true", help="forward stdin to the serial console")
    run.add_argument("--verbose", "-v", action="store_true", help="print progress to stderr")
    run.set_defaults(func=cmd_run)

    info = sub.add_parser("info", help="what this host's KVM supports")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.add_argument("--kvm", default="/dev/kvm", help=argparse.SUPPRESS)
    info.set_defaults(func=cmd_info)

    g = sub.add_parser("guests", help="list the bundled freestanding guests")
    g.set_defaults(func=cmd_guests)

    from hvkit.storage.cli import add_disk_commands
    add_disk_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except GuestCrash as exc:
        print(f"hvkit: {exc}", file=sys.stderr)
        return 125
    except GuestTimeout as exc:
        print(f"hvkit: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 124
    except HvkitError as exc:
        print(f"hvkit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
