"""Linux under hvkit on the real /dev/kvm: the hvkit microVM kernel to a
busybox init, exit codes passed through, Linux's own NVMe driver on hvkit's
controller, and Debian's stock kernel to its banner and e820 map.

The hvkit kernel is built by guests/linux/build.sh (scripts/test.sh runs it;
the result is cached). Where kernel code is emulated (nested PVM hosts) a
boot takes tens of seconds; the tests allow for it.
"""
import glob
import os
import time

import pytest

from hvkit.boot.initramfs import busybox_initramfs
from hvkit.host import kvm_flavor

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

BOOT_TIMEOUT = 600


@pytest.fixture(scope="module")
def initrd():
    return busybox_initramfs()


def boot(microvm, kernel, initrd, run, **kw):
    cmdline = f'console=ttyS0 reboot=k panic=-1 hvkit.run="{run}"'
    return microvm(kernel=kernel, initrd=initrd, cmdline=cmdline, memory="256M", **kw)


def command_initrd() -> bytes:
    """An init that prints its marker, then runs one line read from the
    console and hands its status to the VMM: booted once, snapshotted while
    it waits, and each clone is given its own command."""
    from hvkit.boot.initramfs import init_script
    text = init_script(commands=["echo HVKIT-SNAP-READY", "read -r cmd", 'sh -c "$cmd"',
                                 "rc=$?"], run_cmdline_arg=None)
    return busybox_initramfs(init_script_text=text)


def linux_clone(microvm_clone, vm_snapshots, kernel_dir, devices=None):
    """A clone of the hvkit kernel waiting for a command, with an NVMe disk
    (served in the VMM, so it is saved too) that a test may swap for its own."""
    from hvkit import MicroVM
    from hvkit.storage.raw import RawFileBackend
    from hvkit.vmm.attach import Attachment

    class CloseDisk(Attachment):
        name = "close-disk"
        transient = True

        def __init__(self, disk):
            self.disk = disk

        def close(self):
            self.disk.close()

    def boot_linux():
        vm = MicroVM(kernel=os.path.join(kernel_dir, "vmlinux"), initrd=command_initrd(),
                     memory="256M", cmdline="console=ttyS0 reboot=k panic=-1")
        disk = RawFileBackend.create(os.path.join(vm_snapshots.root, "linux-shell.img"),
                                     64 << 20)
        vm.attach(CloseDisk(disk))       # closed after the controller
        vm.add_nvme([disk], mode="mmio")
        return vm
    return microvm_clone("linux-shell", boot_linux, ready=b"HVKIT-SNAP-READY",
                         timeout=BOOT_TIMEOUT, devices=devices)


def test_hvkit_kernel_runs_command_and_passes_exit_code(microvm_clone, vm_snapshots,
                                                        kernel_dir):
    vm = linux_clone(microvm_clone, vm_snapshots, kernel_dir)
    boot = vm_snapshots.boot_output["linux-shell"].decode(errors="replace")
    assert "HVKIT-INIT-OK" in boot
    assert "BIOS-e820" in boot or "e820" in boot
    vm.start()
    vm.send_input("echo hello-from-linux; uname -r; exit 7\n")
    code = vm.wait(BOOT_TIMEOUT)
    out = vm.console_output.decode(errors="replace")
    assert "hello-from-linux" in out
    assert code == 7, out[-2000:]


def test_linux_clones_answer_commands_independently(microvm_clone, vm_snapshots, kernel_dir):
    """Two clones of one booted Linux, each given its own command: no boot."""
    a, b = (linux_clone(microvm_clone, vm_snapshots, kernel_dir),
            linux_clone(microvm_clone, vm_snapshots, kernel_dir))
    a.start()
    b.start()
    a.send_input("echo clone-a > /tmp/f; cat /tmp/f; exit 11\n")
    b.send_input("cat /tmp/f 2>/dev/null || echo no-file; exit 12\n")
    assert a.wait(BOOT_TIMEOUT) == 11 and b"clone-a" in a.console_output
    assert b.wait(BOOT_TIMEOUT) == 12 and b"no-file" in b.console_output


def test_hvkit_kernel_smp(microvm, kernel_dir, initrd):
    vm = boot(microvm, os.path.join(kernel_dir, "bzImage"), initrd,
              "grep -c ^processor /proc/cpuinfo", vcpus=2)
    code = vm.run(timeout=BOOT_TIMEOUT)
    out = vm.console_output.decode(errors="replace")
    assert code == 0, out[-2000:]
    assert vm.linux.mode == "long64"
    lines = out.replace("\r", "").splitlines()
    assert lines[lines.index("HVKIT-INIT-OK") + 1] == "2"


def test_linux_nvme_driver_writes_what_the_host_reads(microvm_clone, vm_snapshots, kernel_dir,
                                                      tmp_path):
    """A restored Linux (its NVMe controller saved with it) writes through
    the nvme driver to a disk of this test's own; the host reads it back."""
    from hvkit.storage.raw import RawFileBackend
    path = str(tmp_path / "disk.img")
    RawFileBackend.create(path, 64 << 20).close()
    vm = linux_clone(microvm_clone, vm_snapshots, kernel_dir, devices={"nvme0": {"disks": [path]}})
    boot = vm_snapshots.boot_output["linux-shell"].decode(errors="replace")
    assert "nvme0: 1/0/0 default/read/poll queues" in boot or "nvme0n1" in boot, boot[-2000:]
    vm.start()
    vm.send_input("echo hvkit-nvme-data-0123456789 > /d; "
                  "dd if=/d of=/dev/nvme0n1 bs=4096 seek=2 conv=sync,fsync; "
                  "echo 3 > /proc/sys/vm/drop_caches; "
                  "dd if=/dev/nvme0n1 bs=4096 skip=2 count=1 2>/dev/null | head -c 26; echo\n")
    code = vm.wait(BOOT_TIMEOUT)
    out = vm.console_output.decode(errors="replace")
    assert code == 0, out[-2000:]
    assert out.count("hvkit-nvme-data-0123456789") >= 1
    with open(path, "rb") as f:
        f.seek(8192)
        assert f.read(27) == b"hvkit-nvme-data-0123456789\n"


def stock_kernel() -> str:
    found = sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64"))
    if not found:
        pytest.skip("Debian's linux-image-cloud-amd64 is not installed")
    return found[-1]


def wait_for(vm, text: bytes, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not vm.finished.is_set():
        if text in vm.console_output:
            return True
        time.sleep(0.1)
    return text in vm.console_output


@pytest.mark.parametrize("boot_method", ["bzimage", "pvh"])
def test_stock_debian_kernel_prints_banner_and_e820(microvm, initrd, boot_method):
    kernel = stock_kernel()
    vm = microvm(kernel=kernel, initrd=initrd, boot=boot_method, memory="512M",
                 cmdline="console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1")
    vm.start()
    # The RAM entry above 1 MiB comes after the low entries: wait for it.
    seen = wait_for(vm, b"BIOS-e820: [mem 0x0000000000100000-", 300)
    out = vm.console_output.decode(errors="replace")
    vm.stop()
    assert seen, out[-2000:]
    assert "Linux version 6.1" in out
    assert "BIOS-e820: [mem 0x0000000000100000-" in out
    if boot_method == "pvh":
        assert vm.linux.notes   # the VMM extracted the vmlinux from the bzImage


@pytest.mark.skipif(kvm_flavor() == "pvm", reason="this host's KVM emulates guest kernel code "
                    "(nested, PVM-based), where a stock kernel's init cannot make system calls")
def test_stock_debian_kernel_boots_to_init(microvm, initrd):
    vm = microvm(kernel=stock_kernel(), initrd=initrd, memory="512M",
                 cmdline='console=ttyS0 reboot=k panic=-1 hvkit.run="exit 5"')
    assert vm.run(timeout=BOOT_TIMEOUT) == 5
