"""Kernel command lines: joining, encoding limits, the PVM host options."""
from __future__ import annotations

import pytest

from hvkit.boot.cmdline import (BASE_CMDLINE, encode_cmdline, host_tsc_khz, join_cmdline,
                                pvm_cmdline, recommended_cmdline,
                                split_cmdline, write_cmdline)
from hvkit.errors import GuestLoadError
from hvkit.memory.guest import GuestMemory


def test_join_forms():
    assert join_cmdline(BASE_CMDLINE, None, "", ["quiet"], {"init": "/init", "ro": True,
                                                           "debug": False, "x": None}) == \
        "console=ttyS0 reboot=k panic=-1 quiet init=/init ro"
    assert join_cmdline({"hvkit.run": "echo a b"}) == 'hvkit.run="echo a b"'
    assert split_cmdline('a hvkit.run="echo a b" c') == ["a", "hvkit.run=echo a b", "c"]
    with pytest.raises(GuestLoadError, match="quote"):
        join_cmdline({"x": 'a "b" c'})


def test_pvm_options():
    words = pvm_cmdline(2600000).split()
    assert "tsc_early_khz=2600000" in words and "noxsave" in words
    assert "clearcpuid=cx16,popcnt,smap,ssse3,erms,fsrm" in words
    assert "pvm_quirks" in words
    tunables = [w for w in words if w.startswith("GLIBC_TUNABLES=")]
    assert len(tunables) == 1 and "-AVX2" in tunables[0] and "-AVX512F" in tunables[0]
    with pytest.raises(ValueError):
        pvm_cmdline(0)


def test_encode_limits():
    assert encode_cmdline("abc", 4) == b"abc\0"
    with pytest.raises(GuestLoadError, match="at most 3"):
        encode_cmdline("abcd", 4)
    with pytest.raises(GuestLoadError, match="non-ASCII"):
        encode_cmdline("caf\u00e9", 100)
    with pytest.raises(GuestLoadError, match="NUL"):
        encode_cmdline("a\0b", 100)


def test_write_cmdline_bounds():
    mem = GuestMemory.create(1 << 20)
    assert write_cmdline(mem, 0x1000, "console=ttyS0", 64) == 14
    assert mem.read(0x1000, 14) == b"console=ttyS0\0"
    with pytest.raises(Exception):
        write_cmdline(mem, (1 << 20) - 4, "too long for the end", 64)


def test_host_tsc_khz_parses_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\ncpu MHz\t\t: 2596.096\n")
    assert host_tsc_khz(str(info)) == 2596096
    (tmp_path / "empty").write_text("processor\t: 0\n")
    with pytest.raises(GuestLoadError, match="cpu MHz"):
        host_tsc_khz(str(tmp_path / "empty"))


def test_recommended_cmdline_by_flavor():
    assert recommended_cmdline("quiet", flavor="bare") == "console=ttyS0 reboot=k panic=-1 quiet"
    line = recommended_cmdline("quiet", flavor="pvm", tsc_khz=2596096)
    assert line.startswith("console=ttyS0 reboot=k panic=-1 noxsave ")
    assert "tsc_early_khz=2596096" in line and " pvm_quirks " in line
    assert line.endswith(",-FMA4 quiet")
