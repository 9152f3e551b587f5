"""Fixtures shared by the integration tests."""
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def hvkit_kernel_dir() -> str:
    """$HVKIT_LINUX_DIR (scripts/test.sh sets it), else the build script's
    cached result (built now if the kernel source is installed)."""
    d = os.environ.get("HVKIT_LINUX_DIR", "")
    if not d:
        if not os.path.exists("/usr/src/linux-source-6.1.tar.xz"):
            pytest.skip("the hvkit guest kernel is not built and linux-source-6.1 is not "
                        "installed (scripts/test.sh installs and builds both)")
        out = subprocess.run([os.path.join(ROOT, "guests", "linux", "build.sh"), "--print-dir"],
                             capture_output=True, text=True, timeout=3600)
        if out.returncode != 0:
            pytest.fail("guests/linux/build.sh failed: " + out.stderr[-2000:])
        d = out.stdout.strip().splitlines()[-1]
    if not os.path.exists(os.path.join(d, "vmlinux")):
        pytest.skip(f"no hvkit guest kernel in {d}")
    return d


@pytest.fixture(scope="session")
def kernel_dir() -> str:
    """The hvkit guest kernel's build directory (vmlinux, bzImage)."""
    return hvkit_kernel_dir()
