"""virtio-vsock with Firecracker's host side: the guest's connection to host
port 1234 arrives at the UNIX socket ``<uds>_1234``, where this script
answers every message in upper case.

    python examples/virtio_vsock.py [pci|mmio]
"""
import os
import socket
import sys
import tempfile
import threading

from hvkit import MicroVM

transport = sys.argv[1] if len(sys.argv) > 1 else "pci"
uds = os.path.join(tempfile.mkdtemp(), "vsock.sock")
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(uds + "_1234")
server.listen(1)


def answer() -> None:
    conn, _ = server.accept()
    with conn:
        while data := conn.recv(4096):
            print(f"host: got {data!r}")
            conn.sendall(data.upper())


threading.Thread(target=answer, daemon=True).start()
with MicroVM("virtio_vsock", memory="64M", console=sys.stdout,
             args=f"mmio={int(transport == 'mmio')} port=1234 rounds=3") as vm:
    vm.add_virtio_vsock(guest_cid=3, uds_path=uds, transport=transport)
    print(f"guest exit code {vm.run(timeout=60)}")
