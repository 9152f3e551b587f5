#!/usr/bin/env python3
"""The KVM layer on its own, without MicroVM: what a VMM author builds on.

A VM with one memory slot, one vCPU in real mode, and six bytes of guest
code that read a port, add one and write the result to another port. Each
vcpu.run() returns a decoded exit object (IoExit, HltExit, ...), and the
host answers the IN by writing into the shared kvm_run page.
"""
import struct

from hvkit.arch.x86.modes import setup_mode
from hvkit.kvm import Kvm
from hvkit.kvm.exits import HltExit, IoExit
from hvkit.memory.guest import GuestMemory

CODE = 0x1000
PROGRAM = bytes([
    0xE4, 0x10,         # in   $0x10, %al     -> exit: the host supplies a byte
    0xFE, 0xC0,         # inc  %al
    0xE6, 0x11,         # out  %al, $0x11     -> exit: the host sees it + 1
    0xF4,               # hlt                 -> exit (no in-kernel irqchip)
])
KVM_RUN_IO = 32         # the io member of kvm_run's exit union


def answer_in(vcpu, value: bytes) -> None:
    """Complete an IN: KVM copies the bytes at io.data_offset into the
    guest register on the next KVM_RUN."""
    data_offset, = struct.unpack("<Q", vcpu.runner.raw(KVM_RUN_IO + 8, 8))
    vcpu.runner.write_raw(data_offset, value)


with Kvm() as kvm:
    print(f"KVM API version {kvm.api_version}")
    vm = kvm.create_vm()
    mem = GuestMemory.create(2 << 20)    # 2 MiB of memfd-backed RAM at GPA 0
    try:
        vm.map_region(mem.regions[0], 0)     # memory slot 0
        vcpu = vm.create_vcpu(0)
        mem.write(CODE, PROGRAM)
        # Real mode at CS:IP = 0000:1000. (On nested PVM hosts real-mode code
        # is emulated instruction by instruction; seven bytes do not notice.)
        setup_mode(vcpu, mem, "real", CODE)

        while True:
            ex = vcpu.run()
            print(ex)
            if isinstance(ex, IoExit) and not ex.is_out:
                answer_in(vcpu, b"A")            # the guest reads 0x41
            elif isinstance(ex, IoExit):
                print(f"guest wrote {ex.data!r} to port {ex.port:#x}")   # b'B'
            elif isinstance(ex, HltExit):
                break
            else:
                raise SystemExit(f"unexpected exit {ex!r}")
        print(f"halted at rip {vcpu.get_regs().rip:#x}")
    finally:
        vm.close()
        mem.close()
