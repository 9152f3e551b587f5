"""From a VmConfig to a built, not yet running VM: one function per concern.

Each concern has a pure part that decides (``*_plan``: testable without
KVM) and a part that applies the decision to KVM. ``build`` runs them in
order and records how long each phase took in ``Vmm.timings``:

    memory    guest RAM regions (memfd or anonymous), below and above the PCI hole
    vm        the KVM VM: slots, TSS, identity map, irqchip, PIT
    platform  the legacy port map: 16550, exit port, hypercall port, i8042, RTC, port 0x80
    vcpus     vCPUs with their CPUID
    load      the guest: a freestanding ELF, Linux, or the caller's loader/entry state
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Callable, Iterable

from hvkit.arch.x86 import layout
from hvkit.arch.x86.cpuid import build_cpuid
from hvkit.devices.exit_port import ExitPort, NullPorts
from hvkit.devices.hypercall import HypercallPort
from hvkit.devices.i8042 import I8042
from hvkit.devices.irq import CallbackLine
from hvkit.devices.rtc import CmosRtc
from hvkit.devices.serial import Serial16550
from hvkit.errors import ConfigError
from hvkit.memory.guest import GuestMemory, MemoryRegion
from hvkit.vmm.config import VmConfig
from hvkit.vmm.runtime import Vmm

if TYPE_CHECKING:
    from hvkit.arch.x86.profiles import HostProfile
    from hvkit.kvm.structs import CpuidEntry
    from hvkit.kvm.system import Kvm
    from hvkit.kvm.vm import Vm
    from hvkit.vmm.config import EntryState

#: A caller's loader: fills guest memory of the built VM and returns where
#: the boot vCPU starts (or None to keep the config's entry state).
Loader = Callable[[Vmm], "EntryState | None"]

_default_kvm: "Kvm | None" = None


def default_kvm() -> "Kvm":
    """One /dev/kvm handle per process, so VMs share its cached CPUID."""
    global _default_kvm
    from hvkit.kvm.system import Kvm
    if _default_kvm is None or _default_kvm.fd < 0:
        _default_kvm = Kvm()
    return _default_kvm


# -- memory --------------------------------------------------------------------
@dataclass(frozen=True)
class RegionPlan:
    gpa: int
    size: int
    name: str


def memory_plan(config: VmConfig) -> list[RegionPlan]:
    """RAM below the 32-bit PCI hole, and the rest above 4 GiB."""
    low = min(config.memory, layout.MMIO_HOLE_START)
    plan = [RegionPlan(0, low, "ram-low")]
    if config.memory > low:
        plan.append(RegionPlan(layout.MMIO_HOLE_END, config.memory - low, "ram-high"))
    return plan


def build_memory(config: VmConfig) -> GuestMemory:
    memory = GuestMemory()
    try:
        for r in memory_plan(config):
            memory.add_region(MemoryRegion(r.gpa, r.size, backing=config.memory_backing,
                                           hugepages=config.hugepages, name=r.name))
    except BaseException:
        memory.close()
        raise
    return memory


# -- the KVM VM ------------------------------------------------------------------
def create_vm(kvm: "Kvm", memory: GuestMemory, config: VmConfig) -> "Vm":
    vm = kvm.create_vm()
    try:
        for region in memory:
            vm.map_region(region)
        vm.set_tss_addr()
        vm.set_identity_map_addr()
        vm.create_irqchip()
        if config.ports.pit:
            vm.create_pit2()
    except BaseException:
        vm.close()
        raise
    return vm


# -- the legacy platform -----------------------------------------------------------
def attach_console(vmm: Vmm, console: IO[Any] | int | None) -> None:
    """Console bytes are kept in memory and, if given, copied to a file/fd."""
    if console is None:
        return
    if isinstance(console, bool) or not isinstance(console, int):
        try:
            console.flush()
            console = console.fileno()
        except (AttributeError, OSError, ValueError):
            raise ConfigError("console must be a file with a file descriptor "
                              "(or an fd, or None to capture only)") from None
    if console < 0:
        raise ConfigError(f"console fd {console} is not a file descriptor")
    vmm.console.fd = console


def build_legacy_platform(vmm: Vmm) -> None:
    """The PC devices of the port map; the ones set to None are left out."""
    ports = vmm.config.ports
    vm = vmm.vm
    if ports.serial is not None:
        vmm.serial = Serial16550(vmm.console, CallbackLine(
            lambda level: vm.irq_line(layout.COM1_IRQ, level)))
        vmm.add_device(vmm.io_bus, ports.serial, 8, vmm.serial, "com1")
    if ports.exit is not None:
        vmm.add_device(vmm.io_bus, ports.exit, 4, ExitPort(vmm.request_exit), "exit")
    if ports.hypercall is not None:
        vmm.hypercalls = HypercallPort(vmm.memory, ports.hypercall)
        vmm.attach(vmm.hypercalls)
    if ports.i8042 is not None:
        vmm.i8042 = I8042(lambda: vmm.request_exit(0, "reset"))
        vmm.add_device(vmm.io_bus, ports.i8042, 5, vmm.i8042, "i8042")
    if ports.rtc is not None:
        vmm.rtc = CmosRtc()
        vmm.add_device(vmm.io_bus, ports.rtc, 2, vmm.rtc, "rtc")
    if ports.post is not None:
        vmm.add_device(vmm.io_bus, ports.post, 1, NullPorts(), "post")


# -- vCPUs ---------------------------------------------------------------------------
def host_profile(config: VmConfig, tsc_khz: Callable[[], int]) -> "HostProfile":
    """CPUID and command-line shaping for the host: Linux guests only."""
    from hvkit.arch.x86.profiles import NONE, select_profile
    if not config.is_linux:
        return NONE
    return select_profile(config.host_profile, tsc_khz())


def cpuid_plan(supported: Iterable["CpuidEntry"], config: VmConfig, vcpu_id: int,
               profile: "HostProfile") -> list["CpuidEntry"]:
    return build_cpuid(supported, vcpu_id, config.vcpus, clear=profile.cpuid_clear)


#: packed CPUID tables by (kvm, vCPU id, vCPU count, features cleared): the
#: same VM shape gets the same bytes, so a launcher builds them once
_cpuid_cache: dict[tuple[int, int, int, tuple[str, ...]], bytes] = {}


def create_vcpus(vmm: Vmm) -> "HostProfile":
    from hvkit.kvm.structs import pack_cpuid2
    profile = None
    for i in range(vmm.config.vcpus):
        vcpu = vmm.vm.create_vcpu(i)
        if profile is None:
            profile = host_profile(vmm.config, vcpu.get_tsc_khz)
        key = (id(vmm.kvm), i, vmm.config.vcpus, tuple(profile.cpuid_clear))
        table = _cpuid_cache.get(key)
        if table is None:
            entries = cpuid_plan(vmm.kvm.supported_cpuid(), vmm.config, i, profile)
            table = _cpuid_cache[key] = bytes(pack_cpuid2(entries))
        vcpu.set_cpuid2_raw(table)
        vmm.vcpus.append(vcpu)
    return profile


# -- everything ---------------------------------------------------------------------
def build(config: VmConfig, *, kvm: "Kvm | None" = None,
          console: IO[Any] | int | None = None, loader: Loader | None = None,
          into: Vmm | None = None, guest_memory: GuestMemory | None = None,
          restore: Callable[[Vmm], None] | None = None) -> Vmm:
    """Build the VM ``config`` describes; it is ready to ``start()``.

    ``loader`` replaces hvkit's own loading for a config with no guest or
    kernel (a VMM author's image); ``into`` fills a Vmm (or subclass) the
    caller made with ``Vmm(config, kvm)`` instead of a new one. A snapshot
    restore gives its own ``guest_memory`` (the build owns it from then on)
    and a ``restore`` that sets every vCPU and device in place of loading."""
    from hvkit.vmm import loaders
    if not isinstance(config, VmConfig):
        raise ConfigError(f"build() takes a VmConfig, not {type(config).__name__}")
    if loader is not None and (config.guest is not None or config.kernel is not None):
        raise ConfigError("a loader replaces the guest or kernel: give one, not both")
    if loader is not None and not callable(loader):
        raise ConfigError(f"loader {loader!r} is not callable")
    # Bad images are refused before any KVM object exists.
    image = loaders.read_guest(config) if config.guest is not None and restore is None \
        else None
    vmm = into if into is not None else Vmm(config, kvm)
    timings = vmm.timings
    try:
        if vmm.kvm is None:
            vmm.kvm = kvm or default_kvm()
        t = time.perf_counter()
        attach_console(vmm, console)
        vmm.memory = guest_memory if guest_memory is not None else build_memory(config)
        guest_memory = None
        t = _lap(timings, "memory", t)
        vmm.vm = create_vm(vmm.kvm, vmm.memory, config)
        t = _lap(timings, "vm", t)
        build_legacy_platform(vmm)
        t = _lap(timings, "platform", t)
        profile = create_vcpus(vmm)
        t = _lap(timings, "vcpus", t)
        if restore is not None:
            restore(vmm)
        elif image is not None:
            loaders.load_freestanding(vmm, image)
        elif config.is_linux:
            loaders.load_kernel(vmm, profile)
        else:
            loaders.load_custom(vmm, loader)
        _lap(timings, "load", t)
    except BaseException:
        if guest_memory is not None:
            guest_memory.close()
        vmm.close()
        raise
    return vmm


def _lap(timings: dict[str, float], phase: str, since: float) -> float:
    now = time.perf_counter()
    timings[phase] = now - since
    return now
