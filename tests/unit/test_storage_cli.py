"""`hvkit disk ...` subcommands, run through the argparse registration."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from hvkit.storage import metablock as mb
from hvkit.storage.backend import StorageError
from hvkit.storage.cli import main, size_arg
from hvkit.storage.superblock import Geometry
from hvkit.storage.volume import Volume


def run(capsys, *argv):
    try:
        code = main(["disk", *argv] if argv[0] != "frobnicate" else list(argv))
    except SystemExit as e:  # argparse refused the command line
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_create_info_import_export_round_trip(tmp_path, capsys):
    vol, raw, back = (str(tmp_path / n) for n in ("v.vol", "in.raw", "out.raw"))
    data = bytearray(3 << 20)
    data[5000:9000] = os.urandom(4000)
    data[(2 << 20) + 7:(2 << 20) + 99] = b"q" * 92
    open(raw, "wb").write(data)
    code, out, _ = run(capsys, "create", vol, "--capacity", "16M", "--block-size", "64K",
                       "--sub-block-size", "8K", "--journal-size", "256K")
    assert code == 0 and "created" in out
    code, out, err = run(capsys, "import", vol, raw, "--name", "boot")
    assert code == 0 and "import: 100%" in err
    code, out, _ = run(capsys, "info", vol, "--json")
    info = json.loads(out)
    assert info["disks"] == [{"name": "boot", "size": 3 << 20, "index": 0}]
    assert info["usage"]["blocks_used"] == 2  # zero blocks stayed holes
    assert run(capsys, "export", vol, "boot", back)[0] == 0
    assert open(back, "rb").read() == data
    code, _, err = run(capsys, "export", vol, "boot", back)
    assert code == 2 and "exists" in err
    code, out, _ = run(capsys, "check", vol)
    assert code == 0 and "clean" in out


def test_check_reports_and_repairs_with_exit_codes(tmp_path, capsys):
    vol = str(tmp_path / "v.vol")
    assert run(capsys, "create", vol, "--size", "1M", "--block-size", "64K",
               "--sub-block-size", "8K")[0] == 0
    with open(vol, "r+b") as fh:
        fh.seek(0)
        geom = Geometry.decode(fh.read(4096), 0)
        fh.seek(geom.bitmap_start(0) * mb.META)
        buf = bytearray(fh.read(mb.META))
        buf[mb.HDR + 1] = 0x0F
        fh.seek(geom.bitmap_start(0) * mb.META)
        fh.write(mb.seal(buf))
    code, out, err = run(capsys, "check", vol)
    assert code == 4 and out.count("leaked-block") == 4 and "--repair" in err
    code, out, _ = run(capsys, "check", vol, "--repair")
    assert code == 1 and "repaired" in out
    assert run(capsys, "check", vol)[0] == 0


BAD_INPUTS = [
    # (argv, text the one-line error must contain)
    (["create", "{tmp}/v.vol", "--size", "1M", "--block-size", "0"], "--block-size"),
    (["create", "{tmp}/v.vol", "--size", "1M", "--block-size", "3000"], "--block-size 3000"),
    (["create", "{tmp}/v.vol", "--size", "1M", "--block-size", "2G"], "--block-size"),
    (["create", "{tmp}/v.vol", "--size", "1"], "--size '1' is not a multiple of 512"),
    (["create", "{tmp}/v.vol", "--size", "0"], "--size"),
    (["create", "{tmp}/v.vol", "--size", "ten"], "--size 'ten'"),
    (["create", "{tmp}/v.vol", "--size", "99999999999999999999999G"], "too large"),
    (["create", "{tmp}/v.vol", "--size", "1M", "--sub-block-size", "0"], "--sub-block-size"),
    (["create", "{tmp}/v.vol", "--size", "1M", "--sub-block-size", "1M"], "--sub-block-size"),
    (["create", "{tmp}/v.vol", "--size", "1M", "--journal-size", "0"], "--journal-size"),
    (["create", "{tmp}/v.vol", "--size", "1M", "--journal-size", "10000"], "--journal-size"),
    (["create", "{tmp}/v.vol", "--size", "1M", "--max-files", "0"], "--max-files 0"),
    (["create", "{tmp}/v.vol", "--size", "1M", "--max-files", "x"], "--max-files"),
    (["create", "{tmp}/v.vol", "--size", "1M", "--name", "a/b"], "--name 'a/b'"),
    (["create", "{tmp}/v.vol", "--size", "1M", "--capacity", "512K"], "--capacity"),
    (["create", "{tmp}/v.vol"], "--size"),
    (["create", "{tmp}/no/such/dir/v.vol", "--size", "1M"], "not a directory"),
    (["create", "{tmp}/existing", "--size", "1M"], "exists"),
    (["info", "{tmp}/missing.vol"], "cannot open volume file"),
    (["info", "{tmp}"], "Is a directory"),
    (["info", "{tmp}/existing"], "not a usable block-file volume"),
    (["check", "{tmp}/existing"], "not a block-file volume"),
    (["check", "{tmp}"], "directory"),
    (["check", "{tmp}/missing.vol"], "cannot open volume file"),
    (["import", "{tmp}/good.vol", "{tmp}"], "not a regular file"),
    (["import", "{tmp}/good.vol", "{tmp}/missing.raw"], "cannot open raw image"),
    (["import", "{tmp}/good.vol", "{tmp}/empty.raw"], "is empty"),
    (["import", "{tmp}/good.vol", "{tmp}/existing", "--name", "d"], "already exists"),
    (["import", "{tmp}/good.vol", "{tmp}/existing", "--name", "x/y"], "bad disk name"),
    (["import", "{tmp}/existing", "{tmp}/existing"], "not a usable block-file volume"),
    (["export", "{tmp}/good.vol", "nope", "{tmp}/out.raw"], "no virtual disk named 'nope'"),
    (["export", "{tmp}/good.vol", "d", "{tmp}"], "is a directory"),
    (["export", "{tmp}/good.vol", "d", "{tmp}/existing"], "exists"),
    (["export", "{tmp}/good.vol", "d", "{tmp}/no/such/out.raw"], "No such file"),
    (["frobnicate"], "invalid choice"),
]


@pytest.mark.parametrize("argv, match", BAD_INPUTS, ids=[" ".join(a[:3]) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_hvkit_error_with_exit_2(tmp_path, capsys, argv, match):
    (tmp_path / "existing").write_text("not a volume\n" * 500)
    (tmp_path / "empty.raw").write_bytes(b"")
    assert run(capsys, "create", str(tmp_path / "good.vol"), "--size", "1M",
               "--name", "d", "--block-size", "64K", "--sub-block-size", "8K")[0] == 0
    before = sorted(os.listdir(tmp_path))
    code, out, err = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hvkit: error: "), err
    assert match in lines[0]
    assert sorted(os.listdir(tmp_path)) == before  # nothing made, nothing left


def test_size_options_use_the_one_size_grammar():
    conv = size_arg("--size", multiple=512)
    assert conv("64K") == 65536 and conv("1T") == 1 << 40 and conv("10GiB") == 10 << 30
    assert conv("512") == 512
    for bad in ("ten", "1", "0", "-5M"):
        with pytest.raises(argparse.ArgumentTypeError, match="--size"):
            conv(bad)


def test_a_failed_import_leaves_no_disk_behind(tmp_path, capsys):
    vol, raw = str(tmp_path / "v.vol"), str(tmp_path / "big.raw")
    assert run(capsys, "create", vol, "--capacity", "1M", "--block-size", "64K",
               "--sub-block-size", "8K")[0] == 0
    with open(raw, "wb") as fh:
        fh.write(os.urandom(2 << 20))  # twice what the volume holds
    code, _, err = run(capsys, "import", vol, raw, "--name", "big")
    assert code == 2 and "volume full" in err
    code, out, _ = run(capsys, "info", vol, "--json")
    info = json.loads(out)
    assert info["disks"] == [] and info["usage"]["blocks_used"] == 0
    assert run(capsys, "check", vol)[0] == 0


def test_an_import_that_stopped_is_marked_and_check_rolls_it_back(tmp_path, capsys):
    vol = str(tmp_path / "v.vol")
    assert run(capsys, "create", vol, "--capacity", "1M", "--block-size", "64K",
               "--sub-block-size", "8K")[0] == 0
    with Volume.open(vol) as v:  # as if the import was killed half-way
        d = v.create_file("half", 512 << 10, incomplete=True)
        v.write(d, 0, b"x" * 4096)
        v.write(d, 256 << 10, b"y" * 4096)
    from hvkit.storage.vdisk import VirtualDisk
    with pytest.raises(StorageError, match="incomplete"):
        VirtualDisk.open(vol, "half")
    code, out, _ = run(capsys, "info", vol)
    assert "incomplete" in out
    assert run(capsys, "export", vol, "half", str(tmp_path / "o.raw"))[0] == 2
    code, out, _ = run(capsys, "check", vol)
    assert code == 4 and "incomplete-disk" in out
    code, out, _ = run(capsys, "check", vol, "--repair")
    assert code == 1 and "removed incomplete disk 'half'" in out
    code, out, _ = run(capsys, "info", vol, "--json")
    assert json.loads(out)["disks"] == [] and json.loads(out)["usage"]["blocks_used"] == 0


def test_two_imports_into_one_volume_cannot_interleave(tmp_path, capsys):
    vol, raw = str(tmp_path / "v.vol"), str(tmp_path / "r.raw")
    assert run(capsys, "create", vol, "--capacity", "4M", "--block-size", "64K",
               "--sub-block-size", "8K")[0] == 0
    open(raw, "wb").write(os.urandom(256 << 10))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from hvkit.storage.volume import Volume; "
         "v = Volume.open(sys.argv[1]); print('open', flush=True); sys.stdin.read()", vol],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "open\n"
        code, _, err = run(capsys, "import", vol, raw, "--name", "r")
        assert code == 2 and f"in use by PID {holder.pid}" in err
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert run(capsys, "import", vol, raw, "--name", "r")[0] == 0


_LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
from hvkit.storage.cli import main
sys.exit(main(sys.argv[2:]))
"""


def limited(limit: int, *argv: str) -> subprocess.CompletedProcess:
    """`hvkit disk ...` in a process that cannot write past ``limit`` bytes
    (EFBIG, as a full file system gives ENOSPC)."""
    return subprocess.run([sys.executable, "-c", _LIMITED, str(limit), "disk", *argv],
                          capture_output=True, text=True, timeout=120)


def test_a_full_file_system_is_a_one_line_error_and_leaves_nothing(tmp_path, capsys):
    vol, raw = str(tmp_path / "v.vol"), str(tmp_path / "r.raw")
    r = limited(1 << 20, "create", vol, "--size", "64M")
    assert r.returncode == 2 and r.stderr.startswith("hvkit: error: ")
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert os.listdir(tmp_path) == []
    assert run(capsys, "create", vol, "--capacity", "8M", "--block-size", "64K",
               "--sub-block-size", "8K")[0] == 0
    open(raw, "wb").write(os.urandom(2 << 20))
    assert run(capsys, "import", vol, raw, "--name", "r")[0] == 0
    r = limited(1 << 20, "export", vol, "r", str(tmp_path / "out.raw"))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("hvkit: error: ")
    assert "Traceback" not in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["r.raw", "v.vol"]


def test_import_and_export_keep_holes_and_skip_zero_blocks(tmp_path, capsys):
    vol, raw, back = (str(tmp_path / n) for n in ("v.vol", "in.raw", "out.raw"))
    with open(raw, "wb") as fh:
        fh.truncate(64 << 20)
        fh.seek(5 << 20)
        fh.write(b"\xaa" * 4096)
        fh.seek(40 << 20)
        fh.write(bytes(1 << 20))        # written zeros: data on disk, no content
        fh.seek((64 << 20) - 100)
        fh.write(b"end")
    assert run(capsys, "create", vol, "--capacity", "128M")[0] == 0
    assert run(capsys, "import", vol, raw, "--name", "d")[0] == 0
    info = json.loads(run(capsys, "info", vol, "--json")[1])
    assert info["usage"]["blocks_used"] == 2
    assert run(capsys, "export", vol, "d", back)[0] == 0
    assert open(back, "rb").read() == open(raw, "rb").read()
    assert os.stat(back).st_blocks * 512 <= 2 << 20  # holes stayed holes


