"""Initramfs images: newc cpio archives, built in Python.

Linux unpacks a "newc" (SVR4, magic 070701) cpio archive into its rootfs
before running /init. Writing it here (rather than calling cpio(1)) means
no host tool, no root needed for device nodes like /dev/console, and
byte-identical images for the same input (fixed mtimes, inode numbers and
ordering), so images can be cached by content.
"""
from __future__ import annotations

import gzip
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Iterable, Sequence

from hvkit.errors import GuestLoadError

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"
BUSYBOX_PATHS = ("/bin/busybox", "/usr/bin/busybox")
MARKER = "HVKIT-INIT-OK"

# Applets an init script typically calls; linked to /bin/busybox.
DEFAULT_APPLETS = ("sh", "mount", "umount", "mkdir", "echo", "cat", "ls", "poweroff",
                   "reboot", "halt", "sleep", "uname", "dmesg", "ps", "kill", "true",
                   "false", "dd", "wc", "grep", "sed", "head", "tail", "sync", "mknod",
                   "hexdump", "stat", "rm", "cp", "mv", "ln", "env", "printf", "test",
                   "[", "free", "date", "md5sum", "sha256sum", "sort", "uniq", "tr",
                   "cut", "seq", "find", "xargs", "chmod", "touch", "ip", "ifconfig",
                   "mke2fs", "nc", "timeout", "od", "cmp")

#: hvkit's static guest tools (guests/tools/NAME.c, built into hvkit/guests
#: as hvkit-NAME), put in /sbin when built: hvkit-poweroff ends the VM with
#: a status, hvkit-vsock is a vsock client and server (busybox has none)
GUEST_TOOLS = ("hvkit-poweroff", "hvkit-vsock")


@dataclass(frozen=True)
class Entry:
    """One archive member. ``mode`` includes the file type bits
    (``stat.S_IFREG | 0o755``); ``data`` is the content of a file or the
    target of a symlink; ``rdev`` is (major, minor) for device nodes."""

    path: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)
    uid: int = 0
    gid: int = 0
    mtime: int = 0


def file(path: str, data: bytes | str, mode: int = 0o644) -> Entry:
    """A regular file."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    return Entry(path, stat.S_IFREG | (mode & 0o7777), raw)


def directory(path: str, mode: int = 0o755) -> Entry:
    return Entry(path, stat.S_IFDIR | (mode & 0o7777))


def symlink(path: str, target: str) -> Entry:
    return Entry(path, stat.S_IFLNK | 0o777, target.encode())


def char_device(path: str, major: int, minor: int, mode: int = 0o600) -> Entry:
    return Entry(path, stat.S_IFCHR | (mode & 0o7777), rdev=(major, minor))


def block_device(path: str, major: int, minor: int, mode: int = 0o600) -> Entry:
    return Entry(path, stat.S_IFBLK | (mode & 0o7777), rdev=(major, minor))


def _norm(path: str) -> str:
    p = PurePosixPath("/" + path.lstrip("/"))
    parts = [part for part in p.parts[1:] if part not in ("", ".")]
    if ".." in parts:
        raise GuestLoadError(f"initramfs path {path!r} contains '..'")
    if not parts:
        raise GuestLoadError(f"initramfs path {path!r} names the root itself")
    return "/".join(parts)


def _header(name: bytes, ino: int, e: Entry, size: int) -> bytes:
    fields = (ino, e.mode, e.uid, e.gid, 1 if not stat.S_ISDIR(e.mode) else 2, e.mtime,
              size, 0, 0, e.rdev[0], e.rdev[1], len(name) + 1, 0)
    for value in fields:
        if value < 0 or value > 0xFFFFFFFF:
            raise GuestLoadError(f"initramfs entry {e.path!r}: field value {value} does not "
                                 f"fit the newc format (32 bits)")
    return NEWC_MAGIC + b"".join(b"%08X" % v for v in fields)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def write_newc(entries: Iterable[Entry]) -> bytes:
    """A newc cpio archive of ``entries`` (with parent directories added
    where missing, duplicates refused, sorted so that a directory comes
    before what it holds)."""
    by_path: dict[str, Entry] = {}
    for e in entries:
        key = _norm(e.path)
        if key in by_path:
            raise GuestLoadError(f"initramfs has two entries for /{key}")
        fmt = stat.S_IFMT(e.mode)
        if fmt not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR,
                       stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
            raise GuestLoadError(f"initramfs entry /{key}: mode {e.mode:#o} has no file type "
                                 f"(use stat.S_IFREG | perms, or the file()/directory() helpers)")
        if fmt == stat.S_IFDIR and e.data:
            raise GuestLoadError(f"initramfs entry /{key}: a directory cannot have content")
        by_path[key] = e
    for key in list(by_path):
        parts = key.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            existing = by_path.get(parent)
            if existing is None:
                by_path[parent] = directory(parent)
            elif not stat.S_ISDIR(existing.mode):
                raise GuestLoadError(f"initramfs entry /{key} is inside /{parent}, which is "
                                     f"not a directory")
    out = bytearray()
    for ino, key in enumerate(sorted(by_path, key=lambda k: k.split("/")), start=1):
        e = by_path[key]
        name = key.encode()
        data = e.data
        out += _header(name, ino, e, len(data))
        out += name + b"\0"
        out += _pad4(110 + len(name) + 1)
        out += data
        out += _pad4(len(data))
    trailer = Entry(TRAILER, 0)
    out += _header(TRAILER.encode(), 0, trailer, 0) + TRAILER.encode() + b"\0"
    out += _pad4(110 + len(TRAILER) + 1)
    return bytes(out)


def read_newc(archive: bytes) -> list[Entry]:
    """Parse a newc archive (uncompressed or gzip): the inverse of
    ``write_newc``, for tests and for inspecting images."""
    if archive[:2] == b"\x1f\x8b":
        archive = gzip.decompress(archive)
    out: list[Entry] = []
    pos = 0
    while True:
        if pos + 110 > len(archive):
            raise GuestLoadError(f"cpio archive ends at {pos:#x} without a trailer")
        if archive[pos:pos + 6] != NEWC_MAGIC:
            raise GuestLoadError(f"cpio header at {pos:#x} has magic "
                                 f"{archive[pos:pos + 6]!r}, not {NEWC_MAGIC!r} (newc)")
        f = [int(archive[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        _ino, mode, uid, gid, _nlink, mtime, size, _dmaj, _dmin, rmaj, rmin, namesize, _ = f
        name_start = pos + 110
        name = archive[name_start:name_start + namesize - 1].decode()
        data_start = name_start + namesize + (-(110 + namesize) % 4)
        data = archive[data_start:data_start + size]
        if len(data) != size:
            raise GuestLoadError(f"cpio entry {name!r} is truncated")
        pos = data_start + size + (-size % 4)
        if name == TRAILER:
            return out
        out.append(Entry(name, mode, data, (rmaj, rmin), uid, gid, mtime))


def entries_from_dir(root: str | os.PathLike, prefix: str = "/") -> list[Entry]:
    """Entries for everything under a host directory (files, directories,
    symlinks, device nodes, fifos), owned by root in the image."""
    base = os.fspath(root)
    if not os.path.isdir(base):
        raise GuestLoadError(f"{base}: not a directory")
    out: list[Entry] = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames.sort()
        for name in sorted(dirnames) + sorted(filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, base)
            guest = prefix.rstrip("/") + "/" + rel.replace(os.sep, "/")
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as fh:
                    out.append(Entry(guest, st.st_mode, fh.read()))
            elif stat.S_ISLNK(st.st_mode):
                out.append(symlink(guest, os.readlink(full)))
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                out.append(Entry(guest, st.st_mode,
                                 rdev=(os.major(st.st_rdev), os.minor(st.st_rdev))))
            else:
                out.append(Entry(guest, st.st_mode))
    return out


def compress(archive: bytes, method: str | None) -> bytes:
    """``None``/"none" leaves it as is; "gzip" is what every kernel can
    unpack (CONFIG_RD_GZIP). Uncompressed unpacks fastest where guest kernel
    code is emulated."""
    if method in (None, "none"):
        return archive
    if method == "gzip":
        return gzip.compress(archive, compresslevel=6, mtime=0)
    raise GuestLoadError(f"initramfs compression {method!r} is not one of none, gzip")


def build_initramfs(entries: Iterable[Entry] = (), *, directory_root: str | os.PathLike | None = None,
                    compression: str | None = None) -> bytes:
    """An initramfs from explicit entries and/or a host directory; the
    explicit entries win where both name a path."""
    merged: dict[str, Entry] = {}
    if directory_root is not None:
        for e in entries_from_dir(directory_root):
            merged[_norm(e.path)] = e
    for e in entries:
        merged[_norm(e.path)] = e
    return compress(write_newc(merged.values()), compression)


def find_busybox(path: str | None = None) -> str:
    """A statically linked busybox on the host (Debian: busybox-static)."""
    candidates = [path] if path else list(BUSYBOX_PATHS)
    for cand in candidates:
        if cand and os.path.isfile(cand):
            with open(cand, "rb") as fh:
                head = fh.read(4096)
            if head[:4] != b"\x7fELF":
                raise GuestLoadError(f"{cand}: not an ELF executable")
            if _has_interp(cand):
                raise GuestLoadError(f"{cand}: busybox is dynamically linked; the initramfs "
                                     f"needs a static one (apt-get install busybox-static)")
            return cand
    which = shutil.which("busybox")
    if not path and which and not _has_interp(which):
        return which
    raise GuestLoadError("no static busybox found (looked at "
                         f"{', '.join(c for c in candidates if c)}); "
                         "apt-get install busybox-static")


def _has_interp(path: str) -> bool:
    """True when the ELF has a PT_INTERP program header (dynamic linking)."""
    import struct
    with open(path, "rb") as fh:
        ehdr = fh.read(64)
        if len(ehdr) < 64 or ehdr[4] != 2:
            return False
        phoff, = struct.unpack_from("<Q", ehdr, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", ehdr, 0x36)
        fh.seek(phoff)
        table = fh.read(phentsize * phnum)
    return any(struct.unpack_from("<I", table, i * phentsize)[0] == 3 for i in range(phnum))


def init_script(*, marker: str = MARKER, commands: Sequence[str] = (),
                run_cmdline_arg: str | None = "hvkit.run", poweroff: bool = True) -> str:
    """A busybox-sh /init: mount /proc, /sys, /dev; print ``marker``; run
    ``commands`` and, when ``run_cmdline_arg`` is set, the command passed on
    the kernel command line as ``hvkit.run="..."``; then reboot.

    Ends with ``reboot -f``: with ``reboot=k`` Linux pulses the i8042 reset
    line, which hvkit (and QEMU with -no-reboot) turns into a VM exit; plain
    poweroff needs ACPI, which the microVM kernel leaves out.
    """
    lines = [
        "#!/bin/sh",
        "# generated by hvkit.boot.initramfs",
        "export PATH=/bin:/sbin:/usr/bin:/usr/sbin",
        "mount -t proc proc /proc 2>/dev/null",
        "mount -t sysfs sysfs /sys 2>/dev/null",
        "mount -t devtmpfs devtmpfs /dev 2>/dev/null",
        f"echo {_sh_quote(marker)}",
    ]
    lines += list(commands)
    if run_cmdline_arg:
        # /proc/cmdline holds the whole line; pull out name="..." or name=word.
        lines += [
            f'run=$(sed -n \'s/.*{run_cmdline_arg}="\\([^"]*\\)".*/\\1/p; t; '
            f's/.*{run_cmdline_arg}=\\([^ ]*\\).*/\\1/p\' /proc/cmdline)',
            'rc=0',
            'if [ -n "$run" ]; then',
            '  sh -c "$run"',
            '  rc=$?',
            '  echo "hvkit-run-exit=$rc"',
            'fi',
        ]
    if poweroff:
        # hvkit-poweroff hands the status to the VMM through the exit port;
        # elsewhere (QEMU) the reset line ends the VM.
        lines += ["sync", "[ -x /sbin/hvkit-poweroff ] && /sbin/hvkit-poweroff ${rc:-0}",
                  "reboot -f", "sleep 5", "poweroff -f"]
    else:
        lines += ["exec sh"]
    return "\n".join(lines) + "\n"


def _sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def busybox_entries(busybox: str | None = None,
                    applets: Sequence[str] = DEFAULT_APPLETS) -> list[Entry]:
    """/bin/busybox, applet symlinks, the directories and device nodes an
    init needs before devtmpfs is mounted (/dev/console, /dev/null), and
    hvkit's guest tools in /sbin (``GUEST_TOOLS``) where they are built."""
    path = find_busybox(busybox)
    with open(path, "rb") as fh:
        binary = fh.read()
    out = [
        file("/bin/busybox", binary, 0o755),
        directory("/dev"), directory("/proc"), directory("/sys"), directory("/tmp", 0o1777),
        directory("/sbin"), directory("/usr/bin"), directory("/usr/sbin"), directory("/root", 0o700),
        char_device("/dev/console", 5, 1, 0o600),
        char_device("/dev/null", 1, 3, 0o666),
        char_device("/dev/ttyS0", 4, 64, 0o660),
    ]
    for applet in applets:
        if "/" in applet:
            raise GuestLoadError(f"applet name {applet!r} contains '/'")
        out.append(symlink(f"/bin/{applet}", "busybox"))
    tools = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "guests")
    for tool in GUEST_TOOLS:
        path = os.path.join(tools, tool)
        if os.path.exists(path):
            with open(path, "rb") as fh:
                out.append(file(f"/sbin/{tool}", fh.read(), 0o755))
    return out


def busybox_initramfs(*, init_script_text: str | None = None, marker: str = MARKER,
                      commands: Sequence[str] = (), extra: Iterable[Entry] = (),
                      busybox: str | None = None, compression: str | None = None) -> bytes:
    """A complete busybox initramfs: busybox, its applet links, device
    nodes and an /init (``init_script(...)`` unless ``init_script_text`` is
    given). ``extra`` entries are added (and win over the defaults)."""
    text = init_script_text if init_script_text is not None else init_script(
        marker=marker, commands=commands)
    base = busybox_entries(busybox)
    base.append(file("/init", text, 0o755))
    return build_initramfs([*base, *extra], compression=compression)
