import pytest

from hvkit.arch.x86.cpuid import FEATURES
from hvkit.arch.x86.profiles import NONE, HostProfile, select_profile
from hvkit.errors import ConfigError


def test_pvm_profile_shapes_cmdline_and_cpuid():
    p = select_profile("pvm", 2596096)
    line = p.apply_cmdline("console=ttyS0")
    assert line.startswith("console=ttyS0 ")
    assert "tsc_early_khz=2596096" in line and "noxsave" in line
    assert "popcnt" in p.cpuid_clear and "xsave" in p.cpuid_clear
    assert all(name in FEATURES for name in p.cpuid_clear)


def test_user_options_win():
    p = select_profile("pvm", 1000)
    line = p.apply_cmdline("console=ttyS0 tsc_early_khz=5")
    assert "tsc_early_khz=5" in line and "tsc_early_khz=1000" not in line


def test_none_adds_nothing():
    assert select_profile("none", 1).apply_cmdline(" a=b ") == "a=b"
    custom = HostProfile("mine", ("quiet",))
    assert select_profile(custom, 1) is custom
    assert NONE.cpuid_clear == ()


def test_unknown_profile():
    with pytest.raises(ConfigError, match="host profile"):
        select_profile("cloud", 1)
