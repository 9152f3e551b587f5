"""Every subcommand answers bad input with one line, ``hvkit: error: ...``,
exit code 2, and no traceback; nothing it was writing is lost or left."""
import os
import subprocess
import sys

import pytest


def hvkit(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "hvkit", *args], capture_output=True,
                          timeout=60, cwd=cwd, env=env)


def check_refused(r, needle):
    err = r.stderr.decode()
    assert r.returncode == 2, (r.returncode, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hvkit: error: "), err
    assert needle in lines[0], err


@pytest.mark.parametrize("argv,needle", [
    (["run", "/tmp"], "is a directory"),
    (["run", "/dev/zero"], "not a regular file"),
    (["run", "/nonexistent.elf"], "no such guest image"),
    (["run", "hello", "--timeout", "inf"], "--timeout"),
    (["run", "hello", "--timeout", "nan"], "--timeout"),
    (["run", "hello", "--timeout", "-1"], "--timeout"),
    (["run", "hello", "--timeout", "soon"], "--timeout"),
    (["run", "hello", "--memory", "999999999999999999999G"], "memory"),
    (["run", "hello", "--memory", "lots"], "memory"),
    (["run", "hello", "--memory", "1"], "2 MiB minimum"),
    (["run", "hello", "--vcpus", "0"], "vcpus"),
    (["run", "hello", "--vcpus", "17"], "vcpus"),
    (["run", "hello", "--vcpus", "two"], "--vcpus"),
    (["run", "--kernel", "/tmp"], "is a directory"),
    (["run"], "nothing to boot"),
    (["run", "hello", "--kernel", "/boot/x"], "not both"),
    (["run", "--config", "/nonexistent.json"], "config file"),
    (["run", "--config", "/tmp"], "is a directory"),
    (["run", "hello", "--initrd", "x"], "initrd"),
    (["frobnicate"], "invalid choice"),
    (["run", "hello", "--bogus"], "unrecognized"),
    (["initramfs"], "--output"),
    (["run", "hello", "--disk", "/nonexistent.img"], "does not exist"),
    (["run", "hello", "--disk", "/etc/hostname,rw"], "unknown option 'rw'"),
    (["run", "hello", "--vsock", "/nonexistent-dir/v.sock"], "vsock"),
    (["snapshot", "info", "/nonexistent"], "not a snapshot directory"),
    (["snapshot", "info", "/tmp"], "snapshot header"),
    (["snapshot", "restore", "/nonexistent"], "not a snapshot directory"),
    (["snapshot", "restore", "/tmp", "--memory", "fast"], "--memory"),
    (["snapshot", "restore", "/tmp", "--device", "virtio-blk0"], "NAME:KEY=VALUE"),
    (["snapshot", "create", "x", "hello"], "--at"),
    (["snapshot", "create", "x", "hello", "--at", "y", "--vcpus", "99"], "vcpus"),
    (["initramfs", "--list", "/tmp"], "is a directory"),
    (["initramfs", "-o", "/tmp"], "is a directory"),
    (["initramfs", "--no-busybox", "--file", "nocolon", "-o", "x.cpio"], "HOST:GUEST"),
])
def test_bad_input_is_one_line(argv, needle, tmp_path):
    check_refused(hvkit(*argv, cwd=tmp_path), needle)


@pytest.mark.parametrize("content,needle", [
    ("{", "not JSON"),
    ("[]", "JSON object"),
    ('{"guest": "hello", "vcpus": "2"}', "vcpus must be an integer"),
    ('{"guest": "hello", "memroy": "64M"}', "unknown field 'memroy'"),
    ('{"guest": "hello", "ports": {"exit": 1016}}', "overlaps"),
    ('{"guest": "hello", "timeout": -3}', "timeout"),
])
def test_bad_config_file(tmp_path, content, needle):
    cfg = tmp_path / "vm.json"
    cfg.write_text(content)
    check_refused(hvkit("run", "--config", str(cfg)), needle)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a file root cannot read "
                    "as another user")
def test_unreadable_guest_as_another_user(tmp_path_factory):
    import tempfile
    d = tempfile.mkdtemp(prefix="hvkit-perm-")          # /tmp: every user may enter
    os.chmod(d, 0o755)
    guest = os.path.join(d, "g.elf")
    with open(guest, "wb") as f:
        f.write(b"\x7fELF" + bytes(60))
    os.chmod(guest, 0o600)
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        sys.executable, "-c",
                        "import sys; from hvkit.cli import main; sys.exit(main(sys.argv[1:]))",
                        "run", guest], capture_output=True, timeout=60,
                       env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    os.unlink(guest)
    os.rmdir(d)
    check_refused(r, "permission denied")


def test_initramfs_failure_keeps_the_old_file(tmp_path):
    out = tmp_path / "old.cpio"
    out.write_bytes(b"precious")
    r = hvkit("initramfs", "--no-busybox", "--file", f"{tmp_path}/missing:/x", "-o", str(out))
    check_refused(r, "missing")
    assert out.read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path)) == ["old.cpio"]


def test_initramfs_full_disk_keeps_the_old_file(tmp_path):
    # /dev/full answers every write with ENOSPC; a directory that holds a
    # symlink to it would replace the link, so use a tiny tmpfs instead.
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        target = mnt / "init.cpio"
        target.write_bytes(b"old archive")
        big = tmp_path / "big"
        big.write_bytes(os.urandom(256 << 10))
        r = hvkit("initramfs", "--no-busybox", "--file", f"{big}:/big", "-o", str(target))
        check_refused(r, "no space left")
        assert target.read_bytes() == b"old archive"
        assert os.listdir(mnt) == ["init.cpio"]
    finally:
        subprocess.run(["umount", str(mnt)])
