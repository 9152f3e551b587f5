"""`hvkit disk create|info|check|import|export`.

The main ``hvkit`` command calls ``add_disk_commands(subparsers)``; each
handler returns an exit code, prints errors to stderr and progress on long
work.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

from hvkit.errors import HvkitError
from hvkit.storage.check import EXIT_UNCORRECTED, check_volume
from hvkit.storage.superblock import Geometry
from hvkit.storage.volume import Volume

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
COPY_CHUNK = 4 << 20


def parse_size(text: str) -> int:
    """'512', '64K', '1M', '10G', '1T' (binary units) -> bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([bkmgt]?)(?:i?b)?\s*", str(text), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use a number with an "
                                         f"optional K, M, G or T suffix")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def _progress(done: int, total: int, start: float, what: str) -> None:
    rate = done / max(time.monotonic() - start, 1e-9) / (1 << 20)
    print(f"\r{what}: {done * 100 // max(total, 1)}% ({done >> 20} of {total >> 20} MiB, "
          f"{rate:.0f} MiB/s)", end="", file=sys.stderr, flush=True)


def cmd_create(args: argparse.Namespace) -> int:
    capacity = args.capacity or args.size
    geom = Geometry.for_capacity(capacity, block_size=args.block_size,
                                 sub_block_size=args.sub_block_size,
                                 max_files=args.max_files, journal_size=args.journal_size)
    with Volume.create(args.volume, geom) as vol:
        if args.size:
            vol.create_file(args.name, args.size)
    print(f"created {args.volume}: capacity {geom.capacity} bytes in {geom.n_blocks} "
          f"blocks of {geom.block_size}" + (f", disk {args.name!r} of {args.size} bytes"
                                            if args.size else ""))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    with Volume.open(args.volume) as vol:
        g = vol.geom
        info = {
            "path": args.volume,
            "block_size": g.block_size, "sub_block_size": g.sub_block_size,
            "capacity": g.capacity, "journal_bytes": g.journal_blocks * 4096,
            "max_files": g.max_files, "host_file_size": g.file_size,
            "replayed_transactions": vol.replay_report.replayed,
            "usage": vol.usage(),
            "disks": [{"name": f.name, "size": f.size, "index": f.index}
                      for f in vol.files()],
        }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"volume {info['path']}: {g.capacity} bytes capacity, blocks {g.block_size}, "
          f"sub-blocks {g.sub_block_size}, journal {info['journal_bytes']}")
    u = info["usage"]
    print(f"  used: {u['blocks_used']}/{u['blocks_total']} blocks, "
          f"{u['sub_blocks_used']}/{u['sub_blocks_total']} sub-blocks, "
          f"{u['pointer_blocks_used']}/{u['pointer_blocks_total']} pointer blocks; "
          f"{u['host_bytes_allocated']} bytes on the host")
    for d in info["disks"]:
        print(f"  disk {d['name']!r}: {d['size']} bytes")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    rep = check_volume(args.volume, repair=args.repair,
                       progress=lambda s: print(s, file=sys.stderr, flush=True))
    if rep.replayed:
        print(f"replayed {rep.replayed} committed journal transactions")
    for p in rep.problems:
        print(f"{p}" + ("" if p.fixable else " [cannot be fixed]"))
    for r in rep.repaired:
        print(f"repaired: {r}")
    code = rep.exit_code(args.repair)
    if rep.clean:
        print(f"{args.volume}: clean ({rep.files} disks)")
    elif args.repair and code != EXIT_UNCORRECTED:
        after = check_volume(args.volume)
        if not after.clean:
            print(f"{args.volume}: problems remain after repair", file=sys.stderr)
            for p in after.problems:
                print(f"  {p}", file=sys.stderr)
            return EXIT_UNCORRECTED
        print(f"{args.volume}: {len(rep.problems)} problems found and repaired")
    else:
        print(f"{args.volume}: {len(rep.problems)} problems found"
              + ("" if args.repair else " (run with --repair to fix)"), file=sys.stderr)
    return code


def cmd_import(args: argparse.Namespace) -> int:
    """Copy a raw image into a new disk; zero runs stay holes."""
    size = os.path.getsize(args.raw)
    if size == 0:
        raise HvkitError(f"raw image {args.raw!r} is empty")
    name = args.name or os.path.splitext(os.path.basename(args.raw))[0]
    with Volume.open(args.volume) as vol, open(args.raw, "rb") as src:
        fidx = vol.create_file(name, size)
        start = time.monotonic()
        bs = vol.geom.block_size
        done = 0
        while done < size:
            chunk = src.read(min(COPY_CHUNK, size - done))
            if not chunk:
                raise HvkitError(f"raw image {args.raw!r} shrank while being read")
            sg = [(chunk[i:i + bs], done + i) for i in range(0, len(chunk), bs)
                  if chunk[i:i + bs].count(0) != len(chunk[i:i + bs])]
            if sg:
                vol.write_sg(fidx, sg)
            done += len(chunk)
            _progress(done, size, start, "import")
        print(file=sys.stderr)
    print(f"imported {args.raw} as disk {name!r} ({size} bytes)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Copy a disk out to a raw image; holes become holes in the output."""
    with Volume.open(args.volume) as vol:
        fidx = vol.lookup(args.name)
        size = vol.file_info(fidx).size
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if args.force else os.O_EXCL)
        try:
            fd = os.open(args.raw, flags, 0o644)
        except FileExistsError:
            raise HvkitError(f"{args.raw!r} exists (use --force to overwrite)") from None
        try:
            os.ftruncate(fd, size)
            buf = bytearray(COPY_CHUNK)
            start = time.monotonic()
            done = 0
            while done < size:
                n = min(COPY_CHUNK, size - done)
                mv = memoryview(buf)[:n]
                vol.read(fidx, done, mv)
                if mv.tobytes().count(0) != n:
                    os.pwrite(fd, mv, done)
                done += n
                _progress(done, size, start, "export")
            os.fsync(fd)
        finally:
            os.close(fd)
        print(file=sys.stderr)
    print(f"exported disk {args.name!r} to {args.raw} ({size} bytes)")
    return 0


def _run(handler):
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (HvkitError, OSError) as e:
            print(f"hvkit disk: error: {e}", file=sys.stderr)
            return 2
    return wrapped


def add_disk_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``disk create|info|check|import|export``; each subcommand sets
    ``func`` to a handler returning the exit code."""
    disk = subparsers.add_parser("disk", help="block-file disk volumes")
    sub = disk.add_subparsers(dest="disk_command", metavar="COMMAND", required=True)

    p = sub.add_parser("create", help="format a volume, optionally with one disk")
    p.add_argument("volume")
    p.add_argument("--size", type=parse_size, default=0, help="size of the first disk")
    p.add_argument("--name", default="disk0", help="name of the first disk")
    p.add_argument("--capacity", type=parse_size, default=0,
                   help="data capacity of the volume (default: --size)")
    p.add_argument("--block-size", type=parse_size, default=1 << 20)
    p.add_argument("--sub-block-size", type=parse_size, default=64 << 10)
    p.add_argument("--max-files", type=int, default=64)
    p.add_argument("--journal-size", type=parse_size, default=4 << 20)
    p.set_defaults(func=_run(cmd_create))

    p = sub.add_parser("info", help="geometry, usage and disks of a volume")
    p.add_argument("volume")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run(cmd_info))

    p = sub.add_parser("check", help="find inconsistencies (exit 0 clean, 1 repaired, "
                                     "4 problems left)")
    p.add_argument("volume")
    p.add_argument("--repair", action="store_true", help="fix what can be fixed")
    p.set_defaults(func=_run(cmd_check))

    p = sub.add_parser("import", help="copy a raw image into a new disk of a volume")
    p.add_argument("volume")
    p.add_argument("raw")
    p.add_argument("--name", help="disk name (default: the raw file's name)")
    p.set_defaults(func=_run(cmd_import))

    p = sub.add_parser("export", help="copy a disk out to a raw image")
    p.add_argument("volume")
    p.add_argument("name")
    p.add_argument("raw")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=_run(cmd_export))
    return disk


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m hvkit.storage.cli disk ...``)."""
    parser = argparse.ArgumentParser(prog="hvkit")
    add_disk_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
