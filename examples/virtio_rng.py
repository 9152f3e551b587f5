"""virtio-rng over virtio-pci and virtio-mmio: the guest asks the device
for random bytes (the host's getrandom) and hands them to the host by
hypercall.

    python examples/virtio_rng.py [pci|mmio]
"""
import sys

from hvkit import MicroVM

transport = sys.argv[1] if len(sys.argv) > 1 else "pci"
got = []

with MicroVM("virtio_rng", memory="64M", args=f"mmio={int(transport == 'mmio')} bytes=32",
             console=sys.stdout) as vm:
    vm.hypercalls.register(0x1402, lambda call: got.append(
        vm.memory.read(call.args[0], call.args[1])) or 0, "virtio-rng-example")
    vm.add_virtio_rng(transport=transport)
    code = vm.run(timeout=60)
print(f"guest exit code {code}; the guest received {got[0][:32].hex()}...")
