"""`hvkit initramfs`: build a busybox initramfs from the command line.

    hvkit initramfs -o init.cpio                       # busybox + /init
    hvkit initramfs -o init.cpio.gz --gzip --dir ./rootfs --run 'uname -a'
    hvkit initramfs -o init.cpio --init ./my-init.sh --file ./tool:/bin/tool
    hvkit initramfs --list init.cpio
"""
from __future__ import annotations

import argparse
import os
import stat
import sys

from hvkit.boot import initramfs
from hvkit.errors import GuestLoadError, HvkitError
from hvkit.files import atomic_write, read_regular


def add_initramfs_command(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Register ``initramfs`` on an argparse subparsers object; the parser's
    ``func`` default runs it and returns the exit status."""
    p = subparsers.add_parser(
        "initramfs", help="build a busybox initramfs (newc cpio)",
        description="Build a newc cpio initramfs: static busybox with applet links, "
                    "/dev/console and /dev/null, and an /init that prints a marker, runs "
                    "commands (and hvkit.run=\"...\" from the kernel command line) and "
                    "reboots.")
    p.add_argument("-o", "--output", help="file to write (required unless --list)")
    p.add_argument("--list", metavar="CPIO", help="list an existing archive instead")
    p.add_argument("--busybox", help="static busybox to use (default /bin/busybox)")
    p.add_argument("--no-busybox", action="store_true",
                   help="leave busybox out (with --dir/--file/--init only)")
    p.add_argument("--init", metavar="SCRIPT", help="use this file as /init")
    p.add_argument("--marker", default=initramfs.MARKER,
                   help=f"line the generated /init prints first (default {initramfs.MARKER})")
    p.add_argument("--run", action="append", default=[], metavar="CMD",
                   help="shell command for the generated /init (repeatable)")
    p.add_argument("--shell", action="store_true",
                   help="end the generated /init in an interactive shell instead of rebooting")
    p.add_argument("--dir", action="append", default=[], metavar="DIR",
                   help="add a host directory's tree at / (repeatable)")
    p.add_argument("--file", action="append", default=[], metavar="HOST:GUEST",
                   help="add one host file at a guest path (repeatable)")
    p.add_argument("--gzip", action="store_true", help="gzip the archive")
    p.set_defaults(func=run_initramfs_command)
    return p


def run_initramfs_command(args: argparse.Namespace) -> int:
    try:
        if args.list:
            for e in initramfs.read_newc(read_regular(args.list, "cpio archive",
                                                      error=HvkitError)):
                print(f"{stat.filemode(e.mode)} {len(e.data):>9} /{e.path}"
                      + (f" -> {e.data.decode(errors='replace')}" if stat.S_ISLNK(e.mode)
                         else ""))
            return 0
        if not args.output:
            print("hvkit: error: initramfs: -o/--output is required", file=sys.stderr)
            return 2
        entries: list[initramfs.Entry] = []
        for d in args.dir:
            entries += initramfs.entries_from_dir(d)
        if not args.no_busybox:
            entries = initramfs.busybox_entries(args.busybox) + entries
        for spec in args.file:
            host, sep, guest = spec.partition(":")
            if not sep or not guest:
                raise GuestLoadError(f"--file {spec!r}: expected HOST:GUEST")
            data = read_regular(host, "--file", error=HvkitError)
            entries.append(initramfs.file(guest, data, os.stat(host).st_mode & 0o7777))
        if args.init:
            entries.append(initramfs.file("/init", read_regular(args.init, "--init script",
                                                                error=HvkitError), 0o755))
        elif not args.no_busybox:
            entries.append(initramfs.file("/init", initramfs.init_script(
                marker=args.marker, commands=args.run, poweroff=not args.shell), 0o755))
        merged: dict[str, initramfs.Entry] = {}
        for e in entries:
            merged["/" + e.path.strip("/")] = e
        image = initramfs.build_initramfs(merged.values(),
                                          compression="gzip" if args.gzip else None)
        with atomic_write(args.output, "initramfs") as fh:
            fh.write(image)
        print(f"{args.output}: {len(image)} bytes, {len(merged)} entries"
              + (", gzip" if args.gzip else ""))
        return 0
    except (HvkitError, OSError) as exc:
        print(f"hvkit: error: initramfs: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """Run the command on its own (``python -m hvkit.boot.initramfs_cli``)."""
    parser = argparse.ArgumentParser(prog="hvkit")
    sub = parser.add_subparsers(dest="command", required=True)
    add_initramfs_command(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
