"""The freestanding NVMe driver against hvkit's controller, in every doorbell
mode, with the data checked in the guest and again in the backing file."""
import os
import struct

import pytest

from hvkit.storage.raw import RawFileBackend

pytestmark = pytest.mark.kvm

PAGE = 4096


def expected_page(page: int, seed: int = 0x5EED) -> bytes:
    return b"".join(struct.pack("<Q", ((page << 32) ^ ((i * 2654435761) & 0xFFFFFFFF)
                                       ^ seed) & 0xFFFFFFFFFFFFFFFF)
                    for i in range(0, PAGE, 8))


@pytest.fixture
def disk(tmp_path):
    backend = RawFileBackend.create(str(tmp_path / "disk.img"), 32 << 20)
    yield backend, str(tmp_path / "disk.img")
    backend.close()


@pytest.mark.parametrize("mode", ["mmio", "ioeventfd", "shadow"])
@pytest.mark.parametrize("qd", [1, 16])
def test_driver_reads_back_what_it_wrote(microvm, disk, mode, qd):
    backend, path = disk
    shadow = 0 if mode == "mmio" else 1
    vm = microvm("nvme", memory="128M", args=f"ios=128 qd={qd} shadow={shadow}")
    ctrl = vm.add_nvme([backend], mode=mode)
    code = vm.run(timeout=120)
    out = vm.console_output.decode()
    assert code == 0, out
    assert "nvme: ok" in out
    assert ("shadow doorbells on" in out) == bool(shadow)
    # The host sees the guest's data in the backing file.
    with open(path, "rb") as f:
        for page in (0, 17, 63):
            f.seek(page * PAGE)
            assert f.read(PAGE) == expected_page(page)
    if mode != "mmio":
        # I/O doorbells never reached the VMM: only admin-queue MMIO exits.
        assert vm.exit_counts().get("MMIO", 0) < 40
        assert ctrl.accelerator is not None and ctrl.accelerator.alive()


def test_mmio_mode_serves_every_doorbell_in_the_vmm(microvm, disk):
    backend, _ = disk
    vm = microvm("nvme", memory="128M", args="ios=64 qd=1")
    vm.add_nvme([backend], mode="mmio")
    assert vm.run(timeout=120) == 0
    # At least one SQ and one CQ doorbell per I/O went through Python.
    assert vm.exit_counts()["MMIO"] >= 2 * 64


def test_no_controller_is_reported(microvm):
    vm = microvm("nvme", memory="128M")
    assert vm.run(timeout=60) == 2
    assert b"no NVMe controller" in vm.console_output


def test_bad_mode_is_refused(microvm, disk):
    from hvkit.errors import ConfigError
    vm = microvm("nvme")
    with pytest.raises(ConfigError, match="doorbell mode"):
        vm.add_nvme([disk[0]], mode="turbo")
