"""The newc cpio writer: round trips, what cpio(1) and Linux expect, the
busybox helpers and the `hvkit initramfs` command."""
from __future__ import annotations

import argparse
import gzip
import os
import shutil
import stat
import subprocess

import pytest

from hvkit.boot import initramfs as irf
from hvkit.boot.initramfs_cli import add_initramfs_command
from hvkit.errors import GuestLoadError

HAVE_BUSYBOX = any(os.path.isfile(p) for p in irf.BUSYBOX_PATHS)
need_busybox = pytest.mark.skipif(not HAVE_BUSYBOX,
                                  reason="no static busybox: apt-get install busybox-static")


def test_round_trip_all_kinds():
    entries = [
        irf.file("/etc/hostname", "guest\n"),
        irf.file("/bin/tool", b"\x7fELF...", 0o755),
        irf.symlink("/bin/sh", "busybox"),
        irf.char_device("/dev/console", 5, 1),
        irf.block_device("/dev/vda", 254, 0, 0o660),
        irf.directory("/tmp", 0o1777),
    ]
    got = {e.path: e for e in irf.read_newc(irf.write_newc(entries))}
    # parents were added, in order, before their children
    assert list(got)[:2] == ["bin", "bin/sh"]
    assert stat.S_ISDIR(got["etc"].mode) and stat.S_ISDIR(got["dev"].mode)
    assert got["etc/hostname"].data == b"guest\n"
    assert got["bin/tool"].mode == stat.S_IFREG | 0o755
    assert stat.S_ISLNK(got["bin/sh"].mode) and got["bin/sh"].data == b"busybox"
    assert stat.S_ISCHR(got["dev/console"].mode) and got["dev/console"].rdev == (5, 1)
    assert stat.S_ISBLK(got["dev/vda"].mode) and got["dev/vda"].rdev == (254, 0)
    assert got["tmp"].mode == stat.S_IFDIR | 0o1777


def test_format_details_linux_relies_on():
    archive = irf.write_newc([irf.file("a", b"xyz")])
    assert archive.startswith(b"070701")
    assert len(archive) % 4 == 0
    # header fields are 8 ASCII hex digits; the name follows the 110-byte header
    assert archive[110:112] == b"a\0"
    assert archive.rstrip(b"\0").endswith(b"TRAILER!!!")
    # same input, same bytes (cacheable by content)
    assert irf.write_newc([irf.file("a", b"xyz")]) == archive


def test_refuses_bad_entries():
    with pytest.raises(GuestLoadError, match="two entries"):
        irf.write_newc([irf.file("/x", "1"), irf.file("x", "2")])
    with pytest.raises(GuestLoadError, match="'..'"):
        irf.write_newc([irf.file("/a/../etc/passwd", "")])
    with pytest.raises(GuestLoadError, match="not a directory"):
        irf.write_newc([irf.file("/a", ""), irf.file("/a/b", "")])
    with pytest.raises(GuestLoadError, match="no file type"):
        irf.write_newc([irf.Entry("/x", 0o644)])
    with pytest.raises(GuestLoadError, match="magic"):
        irf.read_newc(b"070707" + bytes(200))
    with pytest.raises(GuestLoadError, match="without a trailer"):
        irf.read_newc(irf.write_newc([irf.file("a", "b")])[:120])


def test_gzip_compression_reads_back():
    raw = irf.build_initramfs([irf.file("/init", "#!/bin/sh\n", 0o755)])
    packed = irf.build_initramfs([irf.file("/init", "#!/bin/sh\n", 0o755)], compression="gzip")
    assert gzip.decompress(packed) == raw
    assert [e.path for e in irf.read_newc(packed)] == ["init"]
    with pytest.raises(GuestLoadError, match="compression"):
        irf.build_initramfs([], compression="zip")


def test_from_directory(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "motd").write_text("hi")
    (tmp_path / "run.sh").write_text("echo")
    os.chmod(tmp_path / "run.sh", 0o750)
    os.symlink("etc/motd", tmp_path / "link")
    os.mkfifo(tmp_path / "fifo")
    image = irf.build_initramfs([irf.file("/etc/motd", "override")], directory_root=tmp_path)
    got = {e.path: e for e in irf.read_newc(image)}
    assert got["etc/motd"].data == b"override"          # explicit entries win
    assert got["run.sh"].mode == stat.S_IFREG | 0o750
    assert got["link"].data == b"etc/motd"
    assert stat.S_ISFIFO(got["fifo"].mode)


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed (apt-get install cpio)")
def test_gnu_cpio_lists_it(tmp_path):
    image = irf.write_newc([irf.file("/bin/x", "data", 0o755), irf.symlink("/bin/y", "x"),
                            irf.char_device("/dev/null", 1, 3, 0o666)])
    out = subprocess.run(["cpio", "-itv"], input=image, capture_output=True, check=True).stdout
    text = out.decode()
    assert "bin/x" in text and "bin/y -> x" in text and "dev/null" in text
    assert "1,   3" in text or "1, 3" in text


def test_init_script_parts():
    text = irf.init_script(marker="MARK 1", commands=["uname -a"])
    assert text.startswith("#!/bin/sh\n")
    assert "echo 'MARK 1'" in text
    assert "uname -a" in text
    assert "hvkit.run" in text and "reboot -f" in text
    assert "exec sh" in irf.init_script(poweroff=False, run_cmdline_arg=None)


@need_busybox
def test_busybox_initramfs_contents():
    image = irf.busybox_initramfs(commands=["echo hello"], extra=[irf.file("/etc/x", "y")])
    got = {e.path: e for e in irf.read_newc(image)}
    with open(irf.find_busybox(), "rb") as f:
        assert got["bin/busybox"].data == f.read()
    assert got["init"].mode == stat.S_IFREG | 0o755
    assert b"echo hello" in got["init"].data
    assert got["bin/sh"].data == b"busybox"
    assert got["dev/console"].rdev == (5, 1)
    assert got["etc/x"].data == b"y"


@need_busybox
def test_default_applets_are_in_the_host_busybox():
    """A link to an applet busybox lacks fails only inside the guest
    ("applet not found"): every default one must be in the list."""
    listed = subprocess.run([irf.find_busybox(), "--list"], capture_output=True, text=True,
                            check=True).stdout.split()
    assert set(irf.DEFAULT_APPLETS) <= set(listed), set(irf.DEFAULT_APPLETS) - set(listed)


@need_busybox
def test_guest_tools_go_to_sbin():
    built = os.path.join(os.path.dirname(irf.__file__), "..", "guests")
    got = {e.path: e for e in irf.read_newc(irf.busybox_initramfs())}
    for tool in irf.GUEST_TOOLS:
        path = os.path.join(built, tool)
        if not os.path.exists(path):
            pytest.skip(f"{tool} is not built (make -C guests)")
        with open(path, "rb") as f:
            assert got[f"sbin/{tool}"].data == f.read()
        assert got[f"sbin/{tool}"].mode == stat.S_IFREG | 0o755


@need_busybox
def test_init_script_runs_under_host_busybox(tmp_path):
    """The generated script's hvkit.run parsing, run by the same busybox sh
    against a fake /proc/cmdline."""
    script = irf.init_script(marker="M", run_cmdline_arg="hvkit.run", poweroff=False)
    body = script.split("echo 'M'\n", 1)[1].replace("exec sh\n", "")
    body = body.replace("/proc/cmdline", str(tmp_path / "cmdline"))
    (tmp_path / "cmdline").write_text('console=ttyS0 hvkit.run="echo ran; exit 3" quiet\n')
    out = subprocess.run([irf.find_busybox(), "sh", "-c", body], capture_output=True,
                         text=True, timeout=30)
    assert out.stdout.split() == ["ran", "hvkit-run-exit=3"]
    (tmp_path / "cmdline").write_text("console=ttyS0 hvkit.run=hostname\n")
    out = subprocess.run([irf.find_busybox(), "sh", "-c", body], capture_output=True,
                         text=True, timeout=30)
    assert out.stdout.strip().endswith("hvkit-run-exit=0")


def test_find_busybox_refuses_dynamic(tmp_path):
    with pytest.raises(GuestLoadError, match="dynamically linked"):
        irf.find_busybox("/bin/ls")
    with pytest.raises(GuestLoadError, match="no static busybox"):
        irf.find_busybox(str(tmp_path / "missing"))


def _cli(argv):
    parser = argparse.ArgumentParser(prog="hvkit")
    sub = parser.add_subparsers(dest="command", required=True)
    add_initramfs_command(sub)
    args = parser.parse_args(argv)
    return args.func(args)


@need_busybox
def test_cli_builds_and_lists(tmp_path, capsys):
    host = tmp_path / "tool"
    host.write_bytes(b"#!/bin/sh\necho tool\n")
    os.chmod(host, 0o755)
    out = tmp_path / "rd.cpio.gz"
    assert _cli(["initramfs", "-o", str(out), "--gzip", "--run", "uname -a",
                 "--file", f"{host}:/usr/bin/tool"]) == 0
    got = {e.path: e for e in irf.read_newc(out.read_bytes())}
    assert got["usr/bin/tool"].mode == stat.S_IFREG | 0o755
    assert b"uname -a" in got["init"].data
    capsys.readouterr()
    assert _cli(["initramfs", "--list", str(out)]) == 0
    listing = capsys.readouterr().out
    assert "/usr/bin/tool" in listing and "/bin/sh -> busybox" in listing


def test_cli_errors(tmp_path, capsys):
    assert _cli(["initramfs"]) == 2
    assert _cli(["initramfs", "-o", str(tmp_path / "x"), "--no-busybox",
                 "--file", "nocolon"]) == 2
    assert "HOST:GUEST" in capsys.readouterr().err
