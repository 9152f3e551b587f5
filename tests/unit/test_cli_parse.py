import pytest

from hvkit.cli import build_parser, main
from hvkit.sizes import parse_size
from hvkit.errors import ConfigError


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("run", "info", "guests"):
        assert cmd in out


def test_run_arguments():
    a = build_parser().parse_args(["run", "g.elf", "--memory", "128M", "--vcpus", "2",
                                   "--timeout", "3"])
    assert (a.guest, a.memory, a.vcpus, a.timeout) == ("g.elf", "128M", 2, 3.0)


def test_missing_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2


def test_bad_guest_goes_to_stderr(capsys):
    assert main(["run", "/nonexistent.elf"]) == 2
    err = capsys.readouterr().err
    assert "no such guest image" in err


@pytest.mark.parametrize("text,value", [("64M", 64 << 20), ("1G", 1 << 30), ("512k", 512 << 10),
                                        ("4096", 4096), (" 2 MiB", 2 << 20)])
def test_sizes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "-1M", "12Q", "M", "0"])
def test_bad_sizes(text):
    with pytest.raises(ConfigError):
        parse_size(text)


def test_disk_commands_are_wired(tmp_path, capsys):
    vol = str(tmp_path / "v.img")
    assert main(["disk", "create", vol, "--size", "16M"]) == 0
    assert main(["disk", "check", vol]) == 0
    assert main(["disk", "info", "/nonexistent/volume"]) != 0
    assert "nonexistent" in capsys.readouterr().err
