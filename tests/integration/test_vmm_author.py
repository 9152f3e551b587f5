"""A VMM author's guest through the public API: no hvkit guest, their own
image and entry state, their own port map, typed irqchip/PIT state."""
import pytest

from hvkit import MicroVM
from hvkit.errors import ConfigError
from hvkit.kvm.vcpu import MP_STATE_RUNNABLE
from hvkit.vmm import EntryState, PortMap, VmConfig
from hvkit.vmm.builder import build

pytestmark = pytest.mark.kvm

MP_STATE_UNINITIALIZED = 1

# real mode: mov eax,7; mov dx,0x500; out dx,eax; hlt
EXIT_7 = bytes.fromhex("66b807000000" "ba0005" "66ef" "f4")


def exit_with_port(port: int, status_port: int) -> bytes:
    """in al,status_port; movzx eax,al; mov dx,port; out dx,eax; hlt (real mode)."""
    return (bytes([0xE4, status_port]) + bytes.fromhex("660fb6c0")
            + bytes([0xBA]) + port.to_bytes(2, "little") + bytes.fromhex("66eff4"))


def test_entry_state_in_real_mode_without_a_guest():
    with MicroVM(entry=EntryState(mode="real", rip=0x7C00), memory="16M") as vm:
        vm.memory.write(0x7C00, EXIT_7)
        assert vm.run(timeout=20) == 7


def test_loader_places_a_32_bit_image():
    # 32-bit protected mode: mov eax,9; mov dx,0x500; out dx,eax; hlt
    code = bytes.fromhex("b809000000" "66ba0005" "ef" "f4")

    def loader(vmm):
        vmm.memory.write(0x20_0000, code)
        return EntryState(mode="protected", rip=0x20_0000, regs={"rsp": 0x9_0000})

    with MicroVM(loader=loader, memory="16M") as vm:
        assert vm.run(timeout=20) == 9


def test_port_map_moves_and_leaves_out_devices():
    ports = PortMap(exit=0x600, i8042=None, hypercall=0x520)
    with MicroVM(entry=EntryState(mode="real", rip=0x7C00), memory="16M", ports=ports) as vm:
        vm.memory.write(0x7C00, exit_with_port(0x600, 0x64))
        assert vm.run(timeout=20) == 0xFF           # no i8042: the open bus reads all ones
        assert vm.io_bus.find(0x510) is None and vm.io_bus.find(0x520) is not None
    with MicroVM(entry=EntryState(mode="real", rip=0x7C00), memory="16M",
                 ports=PortMap(exit=0x600)) as vm:
        vm.memory.write(0x7C00, exit_with_port(0x600, 0x64))
        assert vm.run(timeout=20) != 0xFF           # the i8042 status register answers


def test_secondary_vcpus_wait_for_sipi_or_start_at_the_entry():
    config = VmConfig(entry=EntryState(mode="real", rip=0x7C00), memory="16M", vcpus=2)
    with build(config) as vmm:
        assert vmm.vcpus[1].get_mp_state() == MP_STATE_UNINITIALIZED
    config = VmConfig(entry=EntryState(mode="real", rip=0x7C00), memory="16M", vcpus=2,
                      secondary_vcpus="entry")
    with build(config) as vmm:
        assert vmm.vcpus[1].get_mp_state() == MP_STATE_RUNNABLE
        assert vmm.vcpus[1].get_regs().rip == 0x7C00


def test_a_loader_and_a_guest_are_not_both_taken():
    with pytest.raises(ConfigError, match="not both"):
        build(VmConfig(guest="hello"), loader=lambda vmm: None)


def test_typed_irqchip_and_pit_state_round_trip():
    with MicroVM("hello") as vm:
        kvm_vm = vm.vm
        pic = kvm_vm.get_pic()
        pic.imr = 0xA5
        kvm_vm.set_pic(pic)
        assert kvm_vm.get_pic().imr == 0xA5
        assert kvm_vm.get_pic(slave=True).irq_base in (0, 8, 0x70)
        io = kvm_vm.get_ioapic()
        assert io.base_address == 0xFEC00000 and len(io.redirtbl) == 24
        io.redirtbl[5] = 0x31
        kvm_vm.set_ioapic(io)
        assert kvm_vm.get_ioapic().vector(5) == 0x31
        pit = kvm_vm.get_pit()
        assert len(pit.channels) == 3
        kvm_vm.set_pit(pit)
        assert kvm_vm.get_pit().channels[0].mode == pit.channels[0].mode


def test_setup_mce(kvm):
    if not kvm.has("MCE") or not kvm.mce_cap_supported() & 0xFF:
        pytest.skip("this host's KVM offers no machine-check banks (KVM_CAP_MCE, "
                    "KVM_X86_GET_MCE_CAP_SUPPORTED bank count 0)")
    with MicroVM("hello") as vm:
        banks = min(10, kvm.mce_cap_supported() & 0xFF)
        cap = vm.vcpus[0].setup_mce(banks)
        assert cap & 0xFF == banks
        with pytest.raises(ConfigError, match="MCE banks"):
            vm.vcpus[0].setup_mce(0)


def test_vcpu_limits_hold():
    # freestanding guests: the runtime's 16, all started and reporting
    with MicroVM("smp", vcpus=16, memory="128M") as vm:
        assert vm.run(timeout=120) == 16
        assert b"all 16 cpus reported" in vm.console_output
    # any other VM: 64 vCPUs with their own APIC IDs
    config = VmConfig(entry=EntryState(mode="real", rip=0x7C00), memory="16M", vcpus=64)
    with build(config) as vmm:
        assert len(vmm.vcpus) == 64
        assert vmm.vcpus[63].get_lapic().get(0x20) >> 24 == 63


def test_mp_table_holds_64_cpus():
    from hvkit.arch.x86.mptable import build_mptable
    table = build_mptable(64)
    assert table.count(b"PCMP") == 1


def removed_ports_program() -> bytes:
    # mov al,'A'; mov dx,0x3f8; out dx,al; mov eax,7; mov dx,0x500; out dx,eax;
    # mov eax,9; mov dx,0x600; out dx,eax; hlt
    return bytes.fromhex("b041" "baf803" "ee" "66b807000000" "ba0005" "66ef"
                         "66b809000000" "ba0006" "66ef" "f4")


@pytest.mark.parametrize("native", [True, False])
def test_a_removed_port_stops_answering(native):
    from hvkit.devices.exit_port import ExitPort
    with MicroVM(entry=EntryState(mode="real", rip=0x7C00), memory="16M",
                 native_devices=native) as vm:
        vm.memory.write(0x7C00, removed_ports_program())
        vm.add_device(vm.io_bus, 0x600, 4, ExitPort(vm.request_exit), "exit2")
        vm.io_bus.unregister(vm.io_bus.find(0x500).device)        # the bus alone is enough
        vm.remove_device(vm.io_bus, vm.serial)
        assert vm.io_bus.find(0x500) is None and vm.io_bus.find(0x3F8) is None
        assert vm.run(timeout=20) == 9              # the removed exit port did not answer
        assert vm.console_output == b""             # nor did the removed UART
    with MicroVM(entry=EntryState(mode="real", rip=0x7C00), memory="16M",
                 native_devices=native) as vm:
        vm.memory.write(0x7C00, removed_ports_program())
        assert vm.run(timeout=20) == 7
        assert vm.console_output == b"A"
