"""`hvkit disk create|info|check|import|export`.

The main ``hvkit`` command calls ``add_disk_commands(subparsers)``; each
handler returns an exit code, prints progress on long work to stderr, and
any bad input ends in one line, ``hvkit: error: <what>``, with exit code 2.
Nothing is left half-made: ``create`` formats a temporary file next to the
target and renames it, ``import`` rolls its disk back on failure, ``export``
writes a temporary file and renames it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Callable, NoReturn

from hvkit.errors import ConfigError, HvkitError
from hvkit.sizes import parse_size
from hvkit.storage import blockmap as bm
from hvkit.storage.check import EXIT_UNCORRECTED, check_volume
from hvkit.storage.imageio import export_raw, import_raw
from hvkit.storage.superblock import MAX_FILES_LIMIT, MIN_JOURNAL_BLOCKS, Geometry
from hvkit.storage.volume import Volume

EXIT_USAGE = 2
SECTOR = 512


def size_arg(what: str, **kw: object) -> Callable[[str], int]:
    """An argparse ``type`` for a size option: ``hvkit.sizes.parse_size``
    with its ``ConfigError`` turned into argparse's error."""
    def convert(text: str) -> int:
        try:
            return parse_size(text, what, **kw)  # type: ignore[arg-type]
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = "size"
    return convert


_progress_line = [False]  # a progress line is open on stderr


def _end_progress() -> None:
    if _progress_line[0]:
        print(file=sys.stderr)
        _progress_line[0] = False


def _progress(what: str) -> Callable[[int, int], None]:
    start = time.monotonic()
    last = [0.0]

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] < 0.2 and done < total:
            return
        last[0] = now
        rate = done / max(now - start, 1e-9) / (1 << 20)
        _progress_line[0] = True
        print(f"\r{what}: {done * 100 // max(total, 1)}% ({done >> 20} of {total >> 20} "
              f"MiB, {rate:.0f} MiB/s)", end="", file=sys.stderr, flush=True)
    return show


def _pow2_between(value: int, option: str, lo: int, hi: int) -> None:
    if value & (value - 1) or not lo <= value <= hi:
        raise ConfigError(f"{option} {value} must be a power of two from {lo >> 10} KiB "
                          f"to {hi >> 20} MiB")


def create_geometry(args: argparse.Namespace) -> Geometry:
    """The geometry ``create`` asks for, each option checked by name."""
    if not args.size and not args.capacity:
        raise ConfigError("give --size (the first disk) or --capacity (an empty volume)")
    _pow2_between(args.block_size, "--block-size", 8 << 10, 1 << 30)
    _pow2_between(args.sub_block_size, "--sub-block-size", 4 << 10, 1 << 30)
    if args.sub_block_size >= args.block_size:
        raise ConfigError(f"--sub-block-size {args.sub_block_size} must be smaller than "
                          f"--block-size {args.block_size}")
    if not 1 <= args.max_files <= MAX_FILES_LIMIT:
        raise ConfigError(f"--max-files {args.max_files} must be 1..{MAX_FILES_LIMIT}")
    if not MIN_JOURNAL_BLOCKS * 4096 <= args.journal_size <= 4 << 30:
        raise ConfigError(f"--journal-size {args.journal_size} must be "
                          f"{MIN_JOURNAL_BLOCKS * 4} KiB..4 GiB")
    if args.journal_size % 4096:
        raise ConfigError(f"--journal-size {args.journal_size} is not a multiple of 4 KiB")
    limit = bm.MAX_FILE_BLOCKS * args.block_size
    if args.size > limit:
        raise ConfigError(f"--size {args.size} is larger than the largest disk with "
                          f"--block-size {args.block_size} ({limit} bytes)")
    if args.size and args.capacity and args.capacity < args.size:
        raise ConfigError(f"--capacity {args.capacity} is smaller than --size {args.size}")
    if args.size and (not args.name or "/" in args.name
                      or len(args.name.encode()) > bm.NAME_MAX):
        raise ConfigError(f"--name {args.name!r} must be 1..{bm.NAME_MAX} bytes without '/'")
    return Geometry.for_capacity(args.capacity or args.size, block_size=args.block_size,
                                 sub_block_size=args.sub_block_size,
                                 max_files=args.max_files, journal_size=args.journal_size)


def cmd_create(args: argparse.Namespace) -> int:
    geom = create_geometry(args)
    target = args.volume
    if os.path.lexists(target):
        raise HvkitError(f"{target!r} exists: hvkit never formats over a file")
    folder = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(folder):
        raise HvkitError(f"cannot create {target!r}: {folder!r} is not a directory")
    tmp = tempfile.mktemp(dir=folder, prefix=f".{os.path.basename(target)}.", suffix=".part")
    try:
        with Volume.create(tmp, geom) as vol:
            if args.size:
                vol.create_file(args.name, args.size)
        try:
            os.link(tmp, target)  # never replaces a file that appeared meanwhile
        except FileExistsError:
            raise HvkitError(f"{target!r} exists: hvkit never formats over a file") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    print(f"created {target}: capacity {geom.capacity} bytes in {geom.n_blocks} "
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
                      | ({"incomplete": True} if f.incomplete else {})
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
        print(f"  disk {d['name']!r}: {d['size']} bytes"
              + (" (incomplete: an import did not finish)" if d.get("incomplete") else ""))
    return 0


def _looks_like_a_volume(path: str) -> None:
    """Refuse a file that is no volume at all (neither superblock bears the
    magic), so ``check`` does not report a text file as a damaged volume."""
    from hvkit.storage import metablock as mb
    try:
        with open(path, "rb") as fh:
            heads = [fh.read(mb.META)[:4], fh.read(mb.META)[:4]]
    except IsADirectoryError:
        raise HvkitError(f"{path!r} is a directory, not a volume") from None
    except OSError as e:
        raise HvkitError(f"cannot open volume file {path!r}: {e.strerror}") from None
    magic = mb.MAGIC.to_bytes(4, "little")
    if magic not in heads:
        raise HvkitError(f"{path!r} is not a block-file volume")


def cmd_check(args: argparse.Namespace) -> int:
    _looks_like_a_volume(args.volume)
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
    name = args.name or os.path.splitext(os.path.basename(args.raw))[0]
    with Volume.open(args.volume) as vol:
        size = import_raw(vol, args.raw, name, _progress("import"))
        _end_progress()
    print(f"imported {args.raw} as disk {name!r} ({size} bytes)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Copy a disk out to a raw image; holes become holes in the output."""
    with Volume.open(args.volume) as vol:
        size = export_raw(vol, args.name, args.raw, force=args.force,
                          progress=_progress("export"))
        _end_progress()
    print(f"exported disk {args.name!r} to {args.raw} ({size} bytes)")
    return 0


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and not isinstance(e, HvkitError) and e.strerror:
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror}"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _run(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (HvkitError, OSError) as e:
            if _progress_line[0]:
                print(file=sys.stderr)
            print(f"hvkit: error: {_message(e)}", file=sys.stderr)
            return EXIT_USAGE
    wrapped.__doc__ = handler.__doc__
    return wrapped


def add_disk_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``disk create|info|check|import|export``; each subcommand sets
    ``func`` to a handler returning the exit code."""
    disk = subparsers.add_parser("disk", help="block-file disk volumes")
    sub = disk.add_subparsers(dest="disk_command", metavar="COMMAND", required=True)

    p = sub.add_parser("create", help="format a volume, optionally with one disk")
    p.add_argument("volume")
    p.add_argument("--size", type=size_arg("--size", multiple=SECTOR), default=0,
                   help="size of the first disk (a multiple of 512 bytes; bare numbers "
                        "are bytes)")
    p.add_argument("--name", default="disk0", help="name of the first disk")
    p.add_argument("--capacity", type=size_arg("--capacity", multiple=SECTOR), default=0,
                   help="data capacity of the volume (default: --size)")
    p.add_argument("--block-size", type=size_arg("--block-size"), default=1 << 20,
                   help="allocation unit, a power of two from 8K to 1G (default 1M)")
    p.add_argument("--sub-block-size", type=size_arg("--sub-block-size"), default=64 << 10,
                   help="unit for small files and tails, a power of two from 4K, "
                        "smaller than the block size (default 64K)")
    p.add_argument("--max-files", type=int, default=64,
                   help=f"disks the volume can hold, 1..{MAX_FILES_LIMIT} (default 64)")
    p.add_argument("--journal-size", type=size_arg("--journal-size"), default=4 << 20,
                   help="journal ring, 64K..4G in 4K steps (default 4M)")
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


class _Parser(argparse.ArgumentParser):
    """argparse errors in hvkit's one form: ``hvkit: error: ...``, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"hvkit: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m hvkit.storage.cli disk ...``)."""
    parser = _Parser(prog="hvkit")
    add_disk_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
