"""Putting a guest into a built VM and setting where its vCPUs start.

Three ways in: a freestanding hvkit ELF (every vCPU starts at its entry
with its own boot stack), Linux (the boot vCPU at the kernel's entry, the
others waiting for INIT/SIPI), or a VMM author's own loader or entry state
(real, 32-bit protected or long mode, registers given).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from hvkit.arch.x86 import layout
from hvkit.arch.x86.modes import setup_mode
from hvkit.arch.x86.msrs import boot_msrs
from hvkit.errors import ConfigError
from hvkit.kvm.structs import Fpu, Lapic, Sregs
from hvkit.kvm.vcpu import MP_STATE_RUNNABLE
from hvkit.vmm.config import EntryState, VmConfig

if TYPE_CHECKING:
    from hvkit.arch.x86.profiles import HostProfile
    from hvkit.boot.elf import ElfImage
    from hvkit.boot.linux import LinuxBoot
    from hvkit.kvm.vcpu import Vcpu
    from hvkit.vmm.runtime import Vmm

APIC_MODE_EXTINT = 0x7
APIC_MODE_NMI = 0x4


def read_guest(config: VmConfig) -> "ElfImage":
    """Parse a freestanding guest and check it fits, before any KVM object."""
    from hvkit import guests
    from hvkit.boot.elf import parse_elf
    image = parse_elf(guests.path(config.guest))
    image.check_fits(min(config.memory, layout.MMIO_HOLE_START),
                     reserved_below=layout.HIMEM_START)
    if image.runtime is not None and config.vcpus > image.runtime.max_cpus:
        raise ConfigError(f"vcpus: {config.vcpus}, but {image.path}'s runtime holds "
                          f"{image.runtime.max_cpus}")
    return image


def setup_cpu(vcpu: "Vcpu", reset_lapic: bytes | None = None) -> Lapic:
    """What firmware would leave: boot MSRs, a clean FPU, LINT0 as ExtINT
    (the PIC) and LINT1 as NMI. Returns the local APIC's state.
    ``reset_lapic``: the state a fresh vCPU of this shape reports, if known
    (spares reading it)."""
    vcpu.set_msrs(boot_msrs())
    vcpu.set_fpu(Fpu())
    lapic = Lapic(reset_lapic) if reset_lapic is not None else vcpu.get_lapic()
    lapic.set(Lapic.LVT_LINT0, APIC_MODE_EXTINT << 8)
    lapic.set(Lapic.LVT_LINT1, APIC_MODE_NMI << 8)
    vcpu.set_lapic(lapic)
    return lapic


#: (local APIC, special registers) a fresh vCPU reports, by (KVM handle, vCPU
#: id, vCPU count): KVM's reset state, the same for every freestanding VM of
#: one shape (its CPUID too), so read once per process instead of per VM
_reset_state: dict[tuple[int, int, int], tuple[bytes, bytes]] = {}


def reset_state(vmm: "Vmm", vcpu: "Vcpu") -> tuple[bytes, Sregs]:
    key = (id(vmm.kvm), vcpu.id, len(vmm.vcpus))
    hit = _reset_state.get(key)
    if hit is None:
        hit = _reset_state[key] = (vcpu.get_lapic().pack(), vcpu.get_sregs().pack())
    return hit[0], Sregs.unpack(hit[1])


def boot_stack(vcpu_id: int) -> int:
    """Top of a freestanding guest's boot stack for one vCPU."""
    top = layout.BOOT_STACK_TOP - vcpu_id * layout.BOOT_STACK_SIZE
    if top - layout.BOOT_STACK_SIZE < layout.PD_ADDR + layout.PD_COUNT * 0x1000:
        raise ConfigError(f"vCPU {vcpu_id}'s boot stack would overlap the page tables")
    return top


def load_freestanding(vmm: "Vmm", image: "ElfImage") -> None:
    """Every vCPU starts with rdi = its index, rsi = the vCPU count, rdx = the
    argument string: at the ELF entry in long mode at CPL0, or, for an image
    with the hvkit runtime's layout, already set up at CPL3 (see
    hvkit.boot.rtlayout: the runtime's own CPL0 set-up is emulated, and
    slow, on nested hosts)."""
    memory = vmm.memory
    image.load(memory, zero_bss=False)      # the builder's RAM is fresh: all zero
    memory.write(layout.GUEST_ARGS_ADDR, vmm.config.args.encode() + b"\0")
    n = len(vmm.vcpus)
    rt = image.runtime
    if rt is not None:
        memory.write(rt.idt, rt.idt_image)
    for vcpu in vmm.vcpus:
        lapic_bytes, sregs = reset_state(vmm, vcpu)
        lapic = setup_cpu(vcpu, lapic_bytes)
        if rt is not None:
            for addr, data in rt.cpu_writes(vcpu.id, lapic.apic_id):
                memory.write(addr, data)
            vcpu.set_sregs(rt.entry_sregs(sregs, vcpu.id))
            vcpu.set_regs(rt.entry_regs(vcpu.id, n, layout.GUEST_ARGS_ADDR))
        else:
            setup_mode(vcpu, memory, "long", image.entry, stack=boot_stack(vcpu.id),
                       regs={"rdi": vcpu.id, "rsi": n, "rdx": layout.GUEST_ARGS_ADDR},
                       sregs=sregs, write_tables=vcpu.id == 0)
        if vcpu.id:
            vcpu.set_mp_state(MP_STATE_RUNNABLE)


def load_kernel(vmm: "Vmm", profile: "HostProfile") -> None:
    from hvkit.arch.x86.e820 import e820_map
    from hvkit.boot.kernel import load_linux
    from hvkit.boot.cmdline import BASE_CMDLINE
    config = vmm.config
    vmm.profile = profile
    cmdline = BASE_CMDLINE if config.cmdline is None else config.cmdline
    vmm.cmdline = profile.apply_cmdline(cmdline)
    vmm.linux = lb = load_linux(vmm.memory, config.kernel, vmm.cmdline, config.initrd,
                                e820_map(vmm.memory), boot=config.boot)
    for vcpu in vmm.vcpus:
        setup_cpu(vcpu)
    start_vcpus(vmm, linux_entry(lb))


def linux_entry(lb: "LinuxBoot") -> EntryState:
    """Where a Linux loader says the boot vCPU starts (its ``regs`` may
    name rip itself)."""
    mode = "long" if lb.mode == "long64" else "protected"
    regs = dict(lb.regs)
    return EntryState(mode=mode, rip=regs.pop("rip", lb.entry), regs=regs)


#: what x86 Linux keeps of its command line (COMMAND_LINE_SIZE), the NUL included
LINUX_CMDLINE_MAX = 2048


def append_cmdline(vmm: "Vmm", text: str) -> str:
    """Add ``text`` to the command line of a built Linux VM that has not
    started, in guest memory too: for devices Linux learns of only from its
    command line (virtio-mmio). Returns the new command line."""
    from hvkit.boot.cmdline import write_cmdline
    from hvkit.errors import GuestLoadError
    if vmm.linux is None:
        raise ConfigError("only a Linux guest has a kernel command line to add to")
    if vmm.state != "created":
        raise ConfigError("Linux reads its command line at boot: add to it before start()")
    new = f"{vmm.cmdline} {text}" if vmm.cmdline else text
    try:
        write_cmdline(vmm.memory, vmm.linux.cmdline_addr, new, LINUX_CMDLINE_MAX)
    except GuestLoadError as exc:
        raise ConfigError(str(exc)) from None
    vmm.cmdline = new
    return new


def load_custom(vmm: "Vmm", loader: "Callable[[Vmm], EntryState | None] | None") -> None:
    """A VMM author's guest: their loader fills memory and says where to
    start; without one the VM waits for the caller (memory is empty and
    the vCPUs start at the config's entry state, long mode at 1 MiB by
    default)."""
    for vcpu in vmm.vcpus:
        setup_cpu(vcpu)
    entry = loader(vmm) if loader is not None else None
    if entry is None:
        entry = vmm.config.entry or EntryState()
    if not isinstance(entry, EntryState):
        raise ConfigError(f"the loader returned {type(entry).__name__}, not an EntryState")
    start_vcpus(vmm, entry)


def start_vcpus(vmm: "Vmm", entry: EntryState) -> None:
    """The boot vCPU at ``entry``; the others at it too or waiting for
    INIT/SIPI, as the config says."""
    secondary = vmm.config.secondary_start
    for vcpu in vmm.vcpus:
        if vcpu.id and secondary == "wait-sipi":
            continue
        set_entry(vcpu, vmm, entry, write_tables=vcpu.id == 0)
        if vcpu.id:
            vcpu.set_mp_state(MP_STATE_RUNNABLE)


def set_entry(vcpu: "Vcpu", vmm: "Vmm", entry: EntryState, *, write_tables: bool = True) -> None:
    """Registers for ``entry``; long mode writes hvkit's identity page
    tables and GDT, protected mode a flat GDT, real mode nothing."""
    regs = dict(entry.regs)
    stack = entry.stack if entry.stack is not None else regs.pop("rsp", 0)
    regs.pop("rsp", None)
    setup_mode(vcpu, vmm.memory, entry.mode, entry.rip, stack=stack, regs=regs,
               write_tables=write_tables)
