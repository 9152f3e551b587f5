"""The ``hvkit`` command."""
from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import threading
import time
from typing import NoReturn, Sequence

from hvkit import __version__
from hvkit.errors import ConfigError, GuestCrash, GuestTimeout, HvkitError
from hvkit.vmargs import add_vm_arguments, vm_config

#: exit codes every subcommand shares
EXIT_USAGE = 2        # bad input: a one-line "hvkit: error: ..." on stderr
EXIT_TIMEOUT = 124    # hvkit run: the guest did not finish in --timeout
EXIT_CRASH = 125      # hvkit run: the guest crashed (registers on stderr)
EXIT_INTERNAL = 3     # a defect in hvkit itself (HVKIT_DEBUG=1 shows the traceback)

RUN_EPILOG = """exit codes: the guest's exit code modulo 256; 124 the guest did not
finish within --timeout; 125 the guest crashed; 2 bad input (the guest never
ran). A guest may itself exit with 2, 124 or 125: --json tells them apart
(exit_reason: exit, timeout, crash, ...). --timeout 0 or none: no limit."""


class Parser(argparse.ArgumentParser):
    """argparse with hvkit's one error form: ``hvkit: error: ...``, exit 2."""

    def error(self, message: str) -> NoReturn:
        cmd = self.prog.replace("hvkit", "", 1).strip()
        hint = f" (see 'hvkit {cmd} --help')" if cmd else " (see 'hvkit --help')"
        self.exit(EXIT_USAGE, f"hvkit: error: {message}{hint}\n")


def _forward_stdin(vm) -> None:
    fd = sys.stdin.fileno()
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:
            return
        if not data:
            return
        try:
            vm.send_input(data)
        except HvkitError:      # the VM ended meanwhile
            return


def _device_spec(text: str, flag: str, options: tuple[str, ...]) -> tuple[str, set[str]]:
    """"PATH[,opt...]" -> (PATH, {opt}); unknown options are refused by name."""
    head, *opts = text.split(",")
    if not head:
        raise ConfigError(f"{flag} {text!r}: give a path or name first")
    bad = [o for o in opts if o not in options]
    if bad:
        raise ConfigError(f"{flag} {text!r}: unknown option {bad[0]!r} (known: "
                          f"{', '.join(options)})")
    return head, set(opts)


def add_run_devices(vm, args: argparse.Namespace) -> None:
    """--disk, --net and --vsock as virtio devices (pci unless ",mmio")."""
    for spec in args.disk:
        path, opts = _device_spec(spec, "--disk", ("ro", "mmio"))
        vm.add_virtio_blk(path, read_only="ro" in opts,
                          transport="mmio" if "mmio" in opts else "pci")
    for spec in args.net:
        name, opts = _device_spec(spec, "--net", ("mmio",))
        vm.add_virtio_net(None if name == "auto" else name,
                          transport="mmio" if "mmio" in opts else "pci")
    if args.vsock:
        path, opts = _device_spec(args.vsock, "--vsock", ("mmio",))
        vm.add_virtio_vsock(3, path, transport="mmio" if "mmio" in opts else "pci")


def cmd_run(args: argparse.Namespace) -> int:
    from hvkit.machine import MicroVM
    config = vm_config(args)
    if args.print_config:
        print(config.to_json())
        return 0
    what = config.guest or config.kernel
    if args.verbose:
        print(f"hvkit: booting {what} ({config.memory >> 20} MiB, {config.vcpus} vCPU)",
              file=sys.stderr)
    started = time.monotonic()
    with MicroVM(config=config, console=None if args.json else sys.stdout) as vm:
        add_run_devices(vm, args)
        if args.verbose and config.is_linux:
            print(f"hvkit: command line: {vm.cmdline}", file=sys.stderr)
        built = time.monotonic()
        vm.start()
        if args.input:
            threading.Thread(target=_forward_stdin, args=(vm,), daemon=True).start()
        error: BaseException | None = None
        try:
            code = vm.wait(args.timeout)
        except (GuestCrash, GuestTimeout) as exc:
            if not args.json:
                raise
            code, error = None, exc
        finally:
            sys.stdout.flush()
        if args.verbose:
            print(f"hvkit: guest exited with code {code} ({vm.exit_reason}); "
                  f"exits: {vm.exit_counts()}", file=sys.stderr)
        if args.json:
            out = vm.console_output
            print(json.dumps({
                "exit_reason": vm.exit_reason, "exit_code": code,
                "error": str(error).splitlines()[0] if error else None,
                "console": out.decode("utf-8", errors="replace"),
                "console_base64": base64.b64encode(out).decode(),
                "exits": vm.exit_counts(),
                "timings": {"build_s": built - started, "run_s": time.monotonic() - built,
                            **{f"build_{k}_s": v for k, v in vm.timings.items()}},
            }, indent=2))
            if isinstance(error, GuestTimeout):
                return EXIT_TIMEOUT
            if isinstance(error, GuestCrash):
                return EXIT_CRASH
        return (code or 0) & 0xFF


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
    p = Parser(prog="hvkit", description="A userspace hypervisor toolkit on Linux KVM.")
    p.add_argument("--version", action="version", version=f"hvkit {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser("run", help="boot a guest or a Linux kernel and stream its console",
                         description="Boot a freestanding ELF guest (a path, or the name of a "
                                     "bundled guest such as 'hello'), or a Linux kernel with "
                                     "--kernel, or a VM described by --config FILE (JSON).",
                         epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_vm_arguments(run)
    run.add_argument("--print-config", action="store_true",
                     help="print the VM config these arguments make, as JSON, and exit")
    run.add_argument("--json", action="store_true",
                     help="print a JSON report (exit reason, code, console, exits, timings) "
                          "instead of streaming the console")
    run.add_argument("--disk", action="append", default=[], metavar="PATH[,ro][,mmio]",
                     help="a raw disk image as virtio-blk (repeatable)")
    run.add_argument("--net", action="append", default=[], metavar="TAP|auto[,mmio]",
                     help="virtio-net on a tap hvkit creates with that name (auto: a free "
                          "name); removed when the VM ends (repeatable)")
    run.add_argument("--vsock", metavar="UDS[,mmio]",
                     help="virtio-vsock, guest CID 3, Firecracker's host side on UDS")
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
    from hvkit.snapshot.cli import add_snapshot_commands
    add_snapshot_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except GuestCrash as exc:
        print(f"hvkit: {exc}", file=sys.stderr)
        return EXIT_CRASH
    except GuestTimeout as exc:
        print(f"hvkit: {str(exc).splitlines()[0]}", file=sys.stderr)
        return EXIT_TIMEOUT
    except HvkitError as exc:
        print(f"hvkit: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"hvkit: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a defect of ours: say so in one line
        if os.environ.get("HVKIT_DEBUG"):
            raise
        print(f"hvkit: internal error: {type(exc).__name__}: {exc} "
              "(HVKIT_DEBUG=1 shows the traceback)", file=sys.stderr)
        return EXIT_INTERNAL

if __name__ == "__main__":
    sys.exit(main())
