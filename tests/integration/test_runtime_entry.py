"""hvkit sets the guest runtime up itself and starts its vCPUs at CPL3; the
same images still start the old way, at _start at CPL0, under a loader that
knows nothing of the runtime (another VMM)."""
from hvkit import guests
from hvkit.arch.x86 import layout
from hvkit.boot.elf import parse_elf
from hvkit.machine import MicroVM
from hvkit.vmm import EntryState


def test_vcpus_start_in_the_runtime_at_cpl3():
    img = parse_elf(guests.path("smp"))
    with MicroVM("smp", vcpus=2, memory="64M") as vm:
        for vcpu in vm.vcpus:
            regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
            assert regs.rip == img.symbols["rt_user_start"] and regs.rdi == vcpu.id
            assert sregs.cs.dpl == 3 and sregs.cr3 == img.symbols["rt_pml4"]
        assert vm.run(timeout=30) == 2
    out = vm.console_output.decode()
    assert "cpu 0 apic 0 lapic 0" in out and "cpu 1 apic 1 lapic 1" in out


def test_faults_and_kernel_calls_use_the_tables_the_vmm_wrote():
    with MicroVM("hello", args="exit=5 kcall=1 hypercall=9", memory="64M") as vm:
        assert vm.run(timeout=30) == 5
    out = vm.console_output.decode()
    pml4 = parse_elf(guests.path("hello")).symbols["rt_pml4"]
    assert f"cr3 {pml4:x} pml4 {pml4:x}" in out            # int3 gate -> CPL0 -> back
    assert "hypercall 9 returned" in out


def _runtime_unaware_loader(name):
    def loader(vmm):
        img = parse_elf(guests.path(name))
        img.load(vmm.memory)
        vmm.memory.write(layout.GUEST_ARGS_ADDR, b"exit=4\0")
        return EntryState(mode="long", rip=img.entry, stack=layout.BOOT_STACK_TOP,
                          regs={"rdi": 0, "rsi": 1, "rdx": layout.GUEST_ARGS_ADDR})
    return loader


def test_the_runtime_still_sets_itself_up_from_start():
    with MicroVM(loader=_runtime_unaware_loader("hello"), memory="64M") as vm:
        assert vm.vcpus[0].get_sregs().cs.dpl == 0
        assert vm.run(timeout=30) == 4
    assert vm.console_output == b"Hello from an hvkit guest!\n"
