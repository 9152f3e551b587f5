"""The command-line options that describe a VM, shared by ``hvkit run``
and ``hvkit snapshot create``, and the VmConfig they make."""
from __future__ import annotations

import argparse

from hvkit.errors import ConfigError, HvkitError
from hvkit.vmm.config import VmConfig


def add_vm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("guest", nargs="?", help="guest ELF path or bundled guest name")
    p.add_argument("--config", metavar="FILE",
                   help="a VM config (JSON, see run --print-config); flags given override it")
    p.add_argument("--kernel", "-k", help="Linux bzImage or ELF vmlinux (PVH)")
    p.add_argument("--initrd", help="initramfs for --kernel")
    p.add_argument("--cmdline", help="kernel command line (default: serial console, "
                                     "reboot ends the VM)")
    p.add_argument("--boot", choices=("auto", "pvh", "bzimage"), default=None,
                   help="how to enter the kernel (auto: by format)")
    p.add_argument("--host-profile", choices=("auto", "pvm", "none"), default=None,
                   help="CPUID and command-line shaping for this host (default: detect)")
    p.add_argument("--memory", "-m", default=None,
                   help="guest RAM: 64M, 1G; a bare number is MiB (default 64M)")
    p.add_argument("--vcpus", "-c", type=int, default=None, help="number of vCPUs (default 1)")
    p.add_argument("--timeout", "-t", type=timeout_arg, default=None,
                   help="stop after S seconds (0 or none: no limit, the default)")
    p.add_argument("--args", "-a", default=None, help="argument string passed to the guest")


def timeout_arg(text: str) -> float | None:
    """--timeout: seconds; 0 or "none" for no limit."""
    from hvkit.vmm.config import check_timeout
    if text.strip().lower() in ("none", "no", "off"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    try:
        return check_timeout(value, "--timeout")
    except HvkitError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def vm_config(args: argparse.Namespace) -> VmConfig:
    """The VmConfig these options make: --config FILE, with flags on top."""
    flags: dict[str, object] = {}
    for name, value in (("guest", args.guest), ("kernel", args.kernel),
                        ("initrd", args.initrd), ("cmdline", args.cmdline),
                        ("memory", args.memory), ("vcpus", args.vcpus), ("args", args.args),
                        ("boot", args.boot), ("host_profile", args.host_profile)):
        if value is not None:
            flags[name] = value
    if args.config:
        base = VmConfig.from_file(args.config).to_dict()
        if "guest" in flags or "kernel" in flags:
            base.pop("guest", None)
            base.pop("kernel", None)
            if "guest" in flags:
                base.pop("initrd", None)
                base.pop("cmdline", None)
        base.update(flags)
        if "timeout" in base and args.timeout is None:
            args.timeout = base["timeout"]
        return VmConfig.from_dict(base)
    if "guest" not in flags and "kernel" not in flags:
        raise ConfigError("nothing to boot: give a guest ELF, --kernel or --config")
    return VmConfig(**flags)
