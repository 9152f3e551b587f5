"""The microVM guest kernel's inputs: the config fragment is well formed and
asks for what hvkit needs, and the PVM patch applies to Debian's 6.1 source."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
GUEST = os.path.join(HERE, "..", "..", "guests", "linux")
FRAGMENT = os.path.join(GUEST, "microvm.config")
PATCH = os.path.join(GUEST, "pvm-syscall-fault.patch")
SOURCE = "/usr/src/linux-source-6.1.tar.xz"


def _fragment() -> dict[str, str]:
    out: dict[str, str] = {}
    with open(FRAGMENT) as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line or (line.startswith("#") and "is not set" not in line):
                continue
            m = re.fullmatch(r"(CONFIG_[A-Z0-9_]+)=(y|m|\d+|\".*\")", line)
            n_ = re.fullmatch(r"# (CONFIG_[A-Z0-9_]+) is not set", line)
            assert m or n_, f"microvm.config line {n} is not a Kconfig assignment: {line!r}"
            key, value = (m.group(1), m.group(2)) if m else (n_.group(1), "n")
            assert key not in out, f"{key} is set twice in microvm.config"
            out[key] = value
    return out


def test_fragment_asks_for_the_microvm_features():
    cfg = _fragment()
    for key in ("CONFIG_64BIT", "CONFIG_SERIAL_8250_CONSOLE", "CONFIG_BLK_DEV_INITRD",
                "CONFIG_BINFMT_ELF", "CONFIG_BINFMT_SCRIPT", "CONFIG_DEVTMPFS_MOUNT",
                "CONFIG_PROC_FS", "CONFIG_SYSFS", "CONFIG_PVH", "CONFIG_PCI",
                "CONFIG_BLK_DEV_NVME", "CONFIG_X86_MPPARSE", "CONFIG_PRINTK",
                "CONFIG_KERNEL_LZ4"):
        assert cfg.get(key) == "y", key
    for key in ("CONFIG_JUMP_LABEL", "CONFIG_ACPI", "CONFIG_X86_SMAP", "CONFIG_MODULES",
                "CONFIG_LEGACY_PTYS"):
        assert cfg.get(key) == "n", key


def test_patch_touches_only_what_it_says():
    with open(PATCH) as f:
        text = f.read()
    files = re.findall(r"^\+\+\+ b/(\S+)", text, re.M)
    assert files == ["arch/x86/include/asm/processor.h", "arch/x86/kernel/alternative.c",
                     "arch/x86/kernel/fpu/core.c", "arch/x86/mm/fault.c"]
    # the syscall completion is guarded by the exact fault shape
    for guard in ("X86_PF_PROT | X86_PF_USER | X86_PF_INSTR", "entry_SYSCALL_64",
                  "regs->cs != __USER_CS", "do_syscall_64"):
        assert guard in text
    assert 'early_param("pvm_quirks"' in text


@pytest.mark.skipif(not os.path.isfile(SOURCE),
                    reason=f"{SOURCE} absent: apt-get install linux-source-6.1")
@pytest.mark.skipif(shutil.which("patch") is None, reason="patch(1) not installed")
def test_patch_applies_to_debian_source(tmp_path):
    members = ["arch/x86/include/asm/processor.h", "arch/x86/kernel/alternative.c",
               "arch/x86/kernel/fpu/core.c", "arch/x86/mm/fault.c"]
    with tarfile.open(SOURCE) as tar:
        wanted = {f"linux-source-6.1/{m}" for m in members}
        picked = [ti for ti in tar if ti.name in wanted]
        assert len(picked) == len(members)
        tar.extractall(tmp_path, members=picked)
    tree = tmp_path / "linux-source-6.1"
    out = subprocess.run(["patch", "-p1", "--forward", "--dry-run", "-i", PATCH], cwd=tree,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "FAILED" not in out.stdout and "offset" not in out.stdout
