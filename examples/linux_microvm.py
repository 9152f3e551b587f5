"""Boot the hvkit microVM Linux kernel to a busybox shell command and pass
its exit status back (build the kernel first: guests/linux/build.sh).

    python examples/linux_microvm.py [command]
"""
import os
import subprocess
import sys

from hvkit import MicroVM
from hvkit.boot.initramfs import busybox_initramfs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
command = " ".join(sys.argv[1:]) or "uname -a; cat /proc/cpuinfo | grep -c processor"

# The build is cached by a hash of its inputs, so this returns at once after
# the first time.
kernel_dir = os.environ.get("HVKIT_LINUX_DIR") or subprocess.run(
    ["bash", os.path.join(ROOT, "guests/linux/build.sh"), "--print-dir"],
    check=True, capture_output=True, text=True).stdout.split()[-1]

with MicroVM(kernel=os.path.join(kernel_dir, "vmlinux"), initrd=busybox_initramfs(),
             cmdline=f'console=ttyS0 reboot=k panic=-1 hvkit.run="{command}"',
             memory="256M", vcpus=2, console=sys.stdout) as vm:
    # Where kernel code is emulated (nested hosts) this takes tens of seconds.
    code = vm.run(timeout=600)
print(f"\nthe command exited with {code}", file=sys.stderr)
