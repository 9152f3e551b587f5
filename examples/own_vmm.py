#!/usr/bin/env python3
"""A small VMM of your own from hvkit's parts: no hvkit guest, your image,
your entry state, your port map, your device, your ending.

It boots a real-mode "firmware" that prints through a device this script
defines on port 0x3000, then asks that device to end the VM with a code.
Run as root on a host with /dev/kvm:  python examples/own_vmm.py
"""
from __future__ import annotations

import sys

from hvkit.vmm import Attachment, EntryState, PortMap, VmConfig
from hvkit.vmm.builder import build
from hvkit.vmm.runtime import Vmm

# Real-mode code at 0x7c00:
#   mov si, msg; mov dx, 0x3000
# next: lodsb; test al, al; jz done; out dx, al; jmp next
# done: mov al, 42; mov dx, 0x3001; out dx, al; hlt
# msg: "hello from my own VMM\n", 0
FIRMWARE = (bytes.fromhex("be1a7c" "ba0030" "ac" "84c0" "7403" "ee" "ebf8"
                          "b02a" "ba0130" "ee" "f4")
            + b"\0" * 5 + b"hello from my own VMM\n\0")


class DebugPort(Attachment):
    """Port 0x3000 prints a byte; port 0x3001 ends the VM with that code."""

    name = "debug-port"

    def __init__(self) -> None:
        self.text = bytearray()
        self.vmm: Vmm | None = None

    def on_attach(self, vmm: Vmm) -> None:
        self.vmm = vmm
        vmm.add_device(vmm.io_bus, 0x3000, 2, self, "debug")

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        if offset == 0:
            self.text += data[:1]
        else:
            self.vmm.request_exit(data[0])

    def state(self) -> dict:
        return {"text": self.text.decode(errors="replace")}


def load_firmware(vmm: Vmm) -> EntryState:
    vmm.memory.write(0x7C00, FIRMWARE)
    return EntryState(mode="real", rip=0x7C00)


def main() -> int:
    # No serial, RTC, i8042 or hypercall port: this machine has only what we give it.
    config = VmConfig(memory="16M", ports=PortMap(serial=None, rtc=None, i8042=None,
                                                  hypercall=None, exit=None, post=None))
    with build(config, loader=load_firmware) as vmm:
        port = vmm.attach(DebugPort())
        code = vmm.run(timeout=20)
        print(port.text.decode(), end="")
        print(f"exit code {code} ({vmm.exit_reason}); build phases (ms): "
              + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in vmm.timings.items()))
        return 0 if code == 42 else 1


if __name__ == "__main__":
    sys.exit(main())
