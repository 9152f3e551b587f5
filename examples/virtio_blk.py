"""A virtio-blk disk for a freestanding guest: the guest's driver writes a
pattern, reads it back and checks it, and the host reads the same pages
from the image afterwards.

    python examples/virtio_blk.py [pci|mmio]
"""
import os
import struct
import sys
import tempfile

from hvkit import MicroVM
from hvkit.storage.raw import RawFileBackend

transport = sys.argv[1] if len(sys.argv) > 1 else "pci"
path = os.path.join(tempfile.mkdtemp(), "disk.img")
RawFileBackend.create(path, 64 << 20).close()      # a sparse 64 MiB raw image

with MicroVM("virtio_blk", memory="64M", console=sys.stdout,
             args=f"mmio={int(transport == 'mmio')} ios=256 qd=16") as vm:
    disk = vm.add_virtio_blk(path, transport=transport)   # opened here, closed with the VM
    code = vm.run(timeout=120)
    print(f"guest exit code {code}; requests by status {disk.completed}; "
          f"VM exits seen by the VMM: {vm.exit_counts()}")

# Page p holds (p << 32) ^ (i * 2654435761) ^ seed at byte offset i, 8 bytes at a time.
with open(path, "rb") as f:
    f.seek(17 * 4096)
    first = struct.unpack("<Q", f.read(8))[0]
print(f"page 17 starts with {first:#x} (expected {(17 << 32) ^ 0x5EED:#x})")
