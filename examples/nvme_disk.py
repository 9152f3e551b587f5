"""An NVMe disk for a freestanding guest, served by the accelerator process
with shadow doorbells: the guest driver writes, reads back and checks.

    python examples/nvme_disk.py [mmio|ioeventfd|shadow]
"""
import os
import sys
import tempfile

from hvkit import MicroVM
from hvkit.storage.raw import RawFileBackend

mode = sys.argv[1] if len(sys.argv) > 1 else "shadow"
path = os.path.join(tempfile.mkdtemp(), "disk.img")
disk = RawFileBackend.create(path, 64 << 20)      # a sparse 64 MiB raw image

with MicroVM("nvme", memory="128M", args=f"ios=256 qd=8 shadow={int(mode != 'mmio')}",
             console=sys.stdout) as vm:
    ctrl = vm.add_nvme([disk], mode=mode)
    code = vm.run(timeout=120)
    print(f"guest exit code {code}; VM exits seen by the VMM: {vm.exit_counts()}")
disk.close()
print(f"the data is in {path}")
