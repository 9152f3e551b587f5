"""Linux's NVMe driver on hvkit's controller with MSI and MSI-X off
(``pci=nomsi``): the controller's interrupts are PCI INTx, routed through
the MP table to the IOAPIC. Linux must find that route (otherwise: "can't
find IRQ for PCI INT A; probably buggy MP table", and the device is removed),
and the INTx level must drop once the driver consumed its completions (the
controller refuses shadow doorbells without MSI-X, so every CQ head update
reaches it)."""
import os

import pytest

from hvkit.boot.initramfs import busybox_initramfs

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

BOOT_TIMEOUT = 600


@pytest.mark.parametrize("mode", ["mmio", "shadow"])
def test_linux_nvme_on_intx(microvm, kernel_dir, tmp_path, mode):
    from hvkit.storage.raw import RawFileBackend
    path = str(tmp_path / "disk.img")
    backend = RawFileBackend.create(path, 64 << 20)
    run = ("echo hvkit-intx-data-0123456789 > /d; "
           "dd if=/d of=/dev/nvme0n1 bs=4096 seek=3 conv=sync,fsync; "
           "echo 3 > /proc/sys/vm/drop_caches; "
           "dd if=/dev/nvme0n1 bs=4096 skip=3 count=1 2>/dev/null | head -c 26; echo; "
           "grep nvme /proc/interrupts")
    cmdline = f'console=ttyS0 reboot=k panic=-1 pci=nomsi hvkit.run="{run}"'
    vm = microvm(kernel=os.path.join(kernel_dir, "vmlinux"), initrd=busybox_initramfs(),
                 cmdline=cmdline, memory="256M")
    vm.add_nvme([backend], mode=mode)
    try:
        code = vm.run(timeout=BOOT_TIMEOUT)
        out = vm.console_output.decode(errors="replace")
        assert code == 0, out[-3000:]
        assert "can't find IRQ" not in out, out[-3000:]
        assert "nvme0n1" in out
        assert out.count("hvkit-intx-data-0123456789") >= 2       # the echo, and read back
        # the queues' interrupt is an IOAPIC line, not MSI
        lines = [ln for ln in out.replace("\r", "").splitlines() if "nvme0q" in ln]
        assert lines and all("IO-APIC" in ln for ln in lines), out[-3000:]
        assert any(int(ln.split()[1]) > 0 for ln in lines), lines
        with open(path, "rb") as f:
            f.seek(3 * 4096)
            assert f.read(27) == b"hvkit-intx-data-0123456789\n"
    finally:
        backend.close()
