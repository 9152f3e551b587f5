"""The hvkit command as a user runs it."""
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.kvm


def hvkit(*args, input=None):
    return subprocess.run([sys.executable, "-m", "hvkit", *args], capture_output=True,
                          input=input, timeout=60)


def test_run_streams_console_and_passes_exit_code():
    r = hvkit("run", "hello", "--args", "exit=9", "--timeout", "20")
    assert r.returncode == 9
    assert r.stdout == b"Hello from an hvkit guest!\n"


def test_run_with_vcpus_and_memory():
    r = hvkit("run", "smp", "--vcpus", "2", "--memory", "128M", "--timeout", "30")
    assert r.returncode == 2
    assert b"all 2 cpus reported" in r.stdout


def test_run_forwards_stdin():
    r = hvkit("run", "echo", "--input", "--timeout", "30", input=b"xyz\x04")
    assert r.returncode == 3
    assert r.stdout.endswith(b"xyz")


def test_crash_goes_to_stderr_with_nonzero_exit():
    r = hvkit("run", "crash", "--timeout", "20")
    assert r.returncode == 125
    assert b"triple fault" in r.stderr and b"rip=" in r.stderr


def test_timeout_exit_code():
    r = hvkit("run", "echo", "--timeout", "1")
    assert r.returncode == 124
    assert b"did not finish" in r.stderr


def test_info_json():
    r = hvkit("info", "--json")
    assert r.returncode == 0
    info = json.loads(r.stdout)
    assert info["kvm_usable"] and info["api_version"] == 12
    assert info["tsc_khz"] > 0
    assert "TSC_CONTROL" in info["capabilities"]
    assert isinstance(info["ksm_available"], bool)


def test_info_text():
    r = hvkit("info")
    assert r.returncode == 0
    assert b"TSC:" in r.stdout and b"KSM:" in r.stdout


def test_run_with_a_virtio_disk(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(8 << 20))
    for spec, args in ((str(img), "mmio=0"), (f"{img},mmio", "mmio=1")):
        r = hvkit("run", "virtio_blk", "--disk", spec, "--args", args, "--timeout", "60")
        assert r.returncode == 0, r.stdout + r.stderr
        assert b"virtio-blk: ok" in r.stdout
