"""virtio-net on a tap that hvkit creates: the guest sends three frames that
a host packet socket on the tap receives, then the host sends two frames
that the guest checks and sends back. Needs root (a tap).

    sudo python examples/virtio_net.py [pci|mmio]
"""
import socket
import struct
import sys

from hvkit import MicroVM

transport = sys.argv[1] if len(sys.argv) > 1 else "pci"
GUEST_MAC = "52:54:00:12:34:56"


def payload(seq: int, length: int) -> bytes:
    """The pattern guests/virtio_net.c puts after the Ethernet header."""
    return struct.pack("<II", seq, length) + bytes((seq * 7 + i) & 0xFF
                                                   for i in range(8, length - 14))


def frame_from_guest(s: socket.socket, ethertype: int) -> bytes:
    while True:
        data, addr = s.recvfrom(65536)
        if addr[2] != socket.PACKET_OUTGOING and data[12:14] == struct.pack(">H", ethertype):
            return data


with MicroVM("virtio_net", memory="64M", console=sys.stdout,
             args=f"mmio={int(transport == 'mmio')} tx=3 rx=2") as vm:
    net = vm.add_virtio_net(transport=transport, mac=GUEST_MAC)
    tap = net.backend.name
    host_mac = bytes.fromhex(open(f"/sys/class/net/{tap}/address").read().strip()
                             .replace(":", ""))
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3)) as s:
        s.bind((tap, 0))
        s.settimeout(60)
        vm.start()
        for _ in range(3):
            f = frame_from_guest(s, 0x88B5)
            print(f"host: {len(f)}-byte frame from {f[6:12].hex(':')} on {tap}")
        for seq in range(2):
            length = 60 + seq * 97           # the sizes the guest expects
            s.send(bytes.fromhex(GUEST_MAC.replace(":", "")) + host_mac
                   + struct.pack(">H", 0x88B6) + payload(seq, length))
            echo = frame_from_guest(s, 0x88B7)
            print(f"host: frame {seq} came back, {len(echo)} bytes")
    code = vm.wait(60)
    print(f"guest exit code {code}")
sys.exit(0 if code == 0 else 1)
