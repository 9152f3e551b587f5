"""`hvkit disk ...` subcommands, run through the argparse registration."""
from __future__ import annotations

import json
import os

import pytest

from hvkit.storage import metablock as mb
from hvkit.storage.cli import main, parse_size
from hvkit.storage.superblock import Geometry


def run(capsys, *argv):
    code = main(["disk", *argv])
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


@pytest.mark.parametrize("argv, match", [
    (["info", "/nonexistent/v.vol"], "cannot open volume file"),
    (["create", "{tmp}/v.vol", "--size", "1M", "--block-size", "3000"], "power of two"),
])
def test_errors_go_to_stderr_with_non_zero_exit(tmp_path, capsys, argv, match):
    code, out, err = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert code == 2 and match in err and "error" in err


def test_parse_size():
    assert parse_size("64K") == 65536 and parse_size("1T") == 1 << 40
    assert parse_size("10GiB") == 10 << 30 and parse_size("512") == 512
    with pytest.raises(Exception, match="bad size"):
        parse_size("ten")
