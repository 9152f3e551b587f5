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
    from hvkit.errors import ConfigError
    from hvkit.machine import MicroVM
    if (args.guest is None) == (args.kernel is None):
        raise ConfigError("give a guest ELF or --kernel, not both" if args.guest
                          else "nothing to boot: give a guest ELF or --kernel")
    if args.kernel is None and (args.initrd or args.cmdline is not None):
        raise ConfigError("--initrd and --cmdline go with --kernel")
    what = args.guest or args.kernel
    if args.verbose:
        print(f"hvkit: booting {what} ({args.memory}, {args.vcpus} vCPU)", file=sys.stderr)
    kwargs = dict(memory=args.memory, vcpus=args.vcpus, console=sys.stdout)
    if args.kernel:
        kwargs.update(kernel=args.kernel, initrd=args.initrd, cmdline=args.cmdline,
                      boot=args.boot, host_profile=args.host_profile)
    else:
        kwargs.update(args=args.args or "")
    with MicroVM(args.guest, **kwargs) as vm:
        if args.verbose and args.kernel:
            print(f"hvkit: command line: {vm.cmdline}", file=sys.stderr)
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

    run = sub.add_parser("run", help="boot a guest or a Linux kernel and stream its console",
                         description="Boot a freestanding ELF guest (a path, or the name of a "
                                     "bundled guest such as 'hello'), or a Linux kernel with "
                                     "--kernel; exits with the guest's code.")
    run.add_argument("guest", nargs="?", help="guest ELF path or bundled guest name")
    run.add_argument("--kernel", "-k", help="Linux bzImage or ELF vmlinux (PVH)")
    run.add_argument("--initrd", help="initramfs for --kernel")
    run.add_argument("--cmdline", help="kernel command line (default: serial console, "
                                       "reboot ends the VM)")
    run.add_argument("--boot", choices=("auto", "pvh", "bzimage"), default="auto",
                     help="how to enter the kernel (auto: by format)")
    run.add_argument("--host-profile", choices=("auto", "pvm", "none"), default="auto",
                     help="CPUID and command-line shaping for this host (default: detect)")
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
    from hvkit.boot.initramfs_cli import add_initramfs_command
    add_initramfs_command(sub)
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
