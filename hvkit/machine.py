"""MicroVM: assembles guest RAM, vCPUs, devices and a loaded guest.

The builder decides everything in Python before the first KVM_RUN; the
vCPU threads then spend their time in the native loop, entering Python
only for exits that no native device absorbs.
"""
from __future__ import annotations

import os

import threading
import time
from typing import IO, TYPE_CHECKING, Any, Callable

from hvkit import _native
from hvkit.arch.x86 import layout
from hvkit.arch.x86.cpuid import build_cpuid
from hvkit.arch.x86.e820 import e820_map
from hvkit.arch.x86.mptable import write_mptable
from hvkit.arch.x86.profiles import HostProfile, select_profile
from hvkit.boot.cmdline import BASE_CMDLINE
from hvkit.arch.x86.modes import setup_mode
from hvkit.arch.x86.msrs import boot_msrs
from hvkit.boot.elf import ElfImage, parse_elf
from hvkit.devices.bus import Bus, Device
from hvkit.devices.pci import constants as PCI
from hvkit.devices.pci.bar import BarAllocator
from hvkit.devices.pci.bus import PciBus
from hvkit.devices.pci.config_io import PciConfigIo
from hvkit.devices.pci.device import PciDevice
from hvkit.devices.pci.host_bridge import PciHostBridge
from hvkit.devices.exit_port import ExitPort, NullPorts
from hvkit.devices.hypercall import HypercallPort
from hvkit.devices.i8042 import I8042
from hvkit.devices.irq import CallbackLine
from hvkit.devices.rtc import CmosRtc
from hvkit.devices.serial import Serial16550
from hvkit.errors import ConfigError, GuestCrash, GuestTimeout, HvkitError
from hvkit.kvm.caps import ExitReason
from hvkit.kvm.exits import decode
from hvkit.kvm.structs import Fpu, Lapic
from hvkit.kvm.system import Kvm
from hvkit.kvm.vcpu import MP_STATE_RUNNABLE, Vcpu
from hvkit.memory.guest import GuestMemory, MemoryRegion
from hvkit.sizes import parse_size

if TYPE_CHECKING:
    from hvkit.boot.linux import LinuxBoot

MAX_VCPUS = 64
PCI_INTX_GSI_BASE = 16      # IOAPIC pins 16-23 carry PCI INTx, by slot


class KvmMsi:
    """An MsiSender that injects through KVM_SIGNAL_MSI."""

    def __init__(self, vm) -> None:
        self.vm = vm

    def signal_msi(self, address: int, data: int) -> None:
        self.vm.signal_msi(address, data)
APIC_MODE_EXTINT = 0x7
APIC_MODE_NMI = 0x4

_kick_installed = False
_reaper: "_Reaper | None" = None


class _Reaper:
    """Closes KVM file descriptors off the caller's path.

    Destroying a VM costs the kernel 10-25 ms of waiting (not CPU) on this
    kind of host; a launcher that starts many VMs need not wait for it."""

    def __init__(self) -> None:
        import queue
        self.q: "queue.Queue[list[object]]" = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="hvkit-reaper", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            items = self.q.get()
            for item in items:
                try:
                    item.close()
                except Exception:
                    pass
            self.q.task_done()

    def put(self, items: list[object]) -> None:
        self.q.put(items)


def wait_for_closes() -> None:
    """Block until every VM closed with ``close(wait=False)`` is gone."""
    if _reaper is not None:
        _reaper.q.join()
_kick_lock = threading.Lock()
_default_kvm: Kvm | None = None


def default_kvm() -> Kvm:
    """One /dev/kvm handle per process, so VMs share its cached CPUID."""
    global _default_kvm
    if _default_kvm is None or _default_kvm.fd < 0:
        _default_kvm = Kvm()
    return _default_kvm


def _install_kick() -> None:
    global _kick_installed
    with _kick_lock:
        if not _kick_installed:
            _native.install_kick_signal()
            _kick_installed = True


class MicroVM:
    """A microVM running a freestanding ELF guest (or, with the Linux
    loaders, a kernel).

    >>> with MicroVM("hello", memory="64M") as vm:
    ...     code = vm.run(timeout=10)
    ...     print(vm.console_output.decode())
    """

    def __init__(self, guest: str | os.PathLike | None = None, *,
                 memory: int | str = "64M", vcpus: int = 1, args: str = "",
                 console: IO[Any] | int | None = None, hugepages: bool = False,
                 memory_backing: str = "memfd", native_devices: bool = True,
                 kernel: str | os.PathLike | bytes | None = None,
                 initrd: str | os.PathLike | bytes | None = None,
                 cmdline: str | None = None, boot: str = "auto",
                 host_profile: "str | HostProfile" = "auto",
                 kvm: Kvm | None = None) -> None:
        """``guest`` is a freestanding ELF (a path or a bundled name); or
        give ``kernel`` (bzImage or ELF vmlinux), ``initrd`` and ``cmdline``
        to boot Linux. ``host_profile`` ("auto", "pvm", "none") shapes CPUID
        and the command line for the host (see hvkit.arch.x86.profiles)."""
        if (guest is None) == (kernel is None):
            raise ConfigError("give either a freestanding guest or a Linux kernel, not both"
                              if guest is not None else "nothing to boot: give a guest or a kernel")
        self.kernel, self.initrd, self.boot_method = kernel, initrd, boot
        self.cmdline = BASE_CMDLINE if cmdline is None else cmdline
        self._profile_choice = host_profile
        self.linux: "LinuxBoot | None" = None
        self.mem_size = parse_size(memory, "memory")
        if not 1 <= vcpus <= MAX_VCPUS:
            raise ConfigError(f"vcpus must be between 1 and {MAX_VCPUS}, got {vcpus}")
        self.nr_vcpus = vcpus
        self.args = args
        if len(args.encode()) >= layout.GUEST_ARGS_MAX:
            raise ConfigError(f"guest arguments are {len(args.encode())} bytes; "
                              f"the limit is {layout.GUEST_ARGS_MAX - 1}")
        self.image: ElfImage | None = None
        if guest is not None:
            from hvkit import guests
            self.image = parse_elf(guests.path(os.fspath(guest)))
            self.image.check_fits(min(self.mem_size, layout.MMIO_HOLE_START),
                                  reserved_below=layout.HIMEM_START)
        if self.mem_size < 2 << 20:
            raise ConfigError(f"memory {self.mem_size:#x} is below the 2 MiB minimum")
        self._console_target = console
        self.native_devices = native_devices

        self.state = "created"
        self.exit_code: int | None = None
        self.exit_reason: str | None = None
        self.error: BaseException | None = None
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._stopping = False
        self._pause_requested = False
        self._paused = 0
        self._finished = threading.Event()
        self._closed = False
        self.started_at = 0.0

        self.kvm = kvm or default_kvm()
        self.memory = GuestMemory()
        self.vm = None
        self.pci: PciBus | None = None
        self.pci_irqs: list[tuple[int, int, int]] = []
        self._attachments: list[Any] = []
        #: called with the VM just before its vCPUs start, and after it stops
        self.before_start: list[Callable[["MicroVM"], None]] = []
        self.after_stop: list[Callable[["MicroVM"], None]] = []
        self.bar_listeners: list[Callable[[PciDevice, int, int | None, int | None], None]] = []
        try:
            self._build(hugepages, memory_backing)
        except BaseException:
            self.close()
            raise

    # -- assembly ------------------------------------------------------------
    def _build(self, hugepages: bool, backing: str) -> None:
        low = min(self.mem_size, layout.MMIO_HOLE_START)
        self.memory.add_region(MemoryRegion(0, low, backing=backing, hugepages=hugepages,
                                            name="ram-low"))
        if self.mem_size > low:
            self.memory.add_region(MemoryRegion(layout.MMIO_HOLE_END, self.mem_size - low,
                                                backing=backing, hugepages=hugepages,
                                                name="ram-high"))
        self.vm = vm = self.kvm.create_vm()
        for region in self.memory:
            vm.map_region(region)
        vm.set_tss_addr()
        vm.set_identity_map_addr()
        vm.create_irqchip()
        vm.create_pit2()

        self.io_bus = Bus("port-io")
        self.mmio_bus = Bus("mmio")
        self.console = _native.ConsoleSink()
        if isinstance(self._console_target, int):
            self.console.fd = self._console_target
        elif self._console_target is not None:
            try:
                self._console_target.flush()
                self.console.fd = self._console_target.fileno()
            except (AttributeError, OSError, ValueError):
                raise ConfigError("console must be a file with a file descriptor "
                                  "(or an fd, or None to capture only)") from None

        self.serial = Serial16550(self.console, CallbackLine(
            lambda level: vm.irq_line(layout.COM1_IRQ, level)))
        self.add_device(self.io_bus, layout.COM1_PORT, 8, self.serial, "com1")
        self.exit_port = ExitPort(self._python_exit)
        self.add_device(self.io_bus, layout.EXIT_PORT, 4, self.exit_port, "exit")
        self.hypercalls = HypercallPort(self.memory)
        self.add_device(self.io_bus, layout.HYPERCALL_PORT, 4, self.hypercalls, "hypercall")
        self.i8042 = I8042(lambda: self._finish("reset", 0))
        self.add_device(self.io_bus, layout.I8042_DATA_PORT, 5, self.i8042, "i8042")
        self.rtc = CmosRtc()
        self.add_device(self.io_bus, layout.RTC_PORT, 2, self.rtc, "rtc")
        self.add_device(self.io_bus, layout.POST_PORT, 1, NullPorts(), "post")

        supported = self.kvm.supported_cpuid()
        self.vcpus: list[Vcpu] = []
        clear: tuple[str, ...] = ()
        for i in range(self.nr_vcpus):
            vcpu = vm.create_vcpu(i)
            if i == 0 and self.kernel is not None:
                self.profile = select_profile(self._profile_choice, vcpu.get_tsc_khz())
                clear = self.profile.cpuid_clear
            vcpu.set_cpuid2(build_cpuid(supported, i, self.nr_vcpus, clear=clear))
            self.vcpus.append(vcpu)
        if self.image is not None:
            self._load_elf()
        else:
            self._load_linux()

    def add_device(self, bus: Bus, base: int, length: int, device: Device,
                   name: str | None = None) -> None:
        """Put a device on a bus; if it can be served in C, register that too."""
        bus.register(base, length, device, name)
        attach = getattr(device, "attach_native", None)
        if self.native_devices and bus is self.io_bus and attach is not None:
            if isinstance(device, NullPorts):
                attach(self.vm.native, base, length)
            else:
                attach(self.vm.native, base)

    # -- PCI -------------------------------------------------------------------
    def add_pci_device(self, device: PciDevice, slot: int | None = None) -> int:
        """Plug a PCI function into bus 0 and return its devfn.

        hvkit places its BARs (a microVM has no firmware to do it) and keeps
        the buses in step when the guest moves them; INTx goes to IOAPIC pin
        16 + slot % 8; MSI-X messages go through KVM."""
        if self.state != "created":
            raise HvkitError("PCI devices are added before the VM starts")
        if self.pci is None:
            self.pci = PciBus()
            self.pci.add_bar_listener(self._bar_moved)
            self.pci.add(PciHostBridge(), 0)
            self.add_device(self.io_bus, PCI.CONFIG_IO_PORT_BASE, PCI.CONFIG_IO_PORT_LEN,
                            PciConfigIo(self.pci), "pci-config")
            self._bars = BarAllocator()
        devfn = self.pci.add(device, slot)
        gsi = PCI_INTX_GSI_BASE + (devfn >> 3) % 8
        vm = self.vm
        device.attach_intx(CallbackLine(lambda level: vm.irq_line(gsi, level)), gsi)
        self.pci_irqs.append((devfn >> 3, 0, gsi))
        self._bars.assign([device])
        return devfn

    def add_nvme(self, disks, *, mode: str = "mmio", poll_us: int = 200,
                 slot: int | None = None, **controller_args):
        """Add an NVMe controller with one namespace per disk (BlockBackend).

        ``mode`` picks the doorbell path (see hvkit.platform.nvme): "mmio",
        "ioeventfd" or "shadow". Returns the NvmeController."""
        from hvkit.platform.nvme import NvmeAttachment
        att = NvmeAttachment(self, disks, mode=mode, poll_us=poll_us, slot=slot,
                             **controller_args)
        self._attachments.append(att)
        return att.ctrl

    def _bar_moved(self, device: PciDevice, index: int, old: int | None, new: int | None) -> None:
        bar = device.bars[index]
        bus = self.io_bus if bar.is_io else self.mmio_bus
        if old is not None:
            bus.unregister(bar.region, old)
        if new is not None:
            bus.register(new, bar.size, bar.region, f"{device.name}.{bar.name}")
        for listener in list(self.bar_listeners):
            listener(device, index, old, new)

    def _setup_cpu(self, vcpu: Vcpu) -> None:
        vcpu.set_msrs(boot_msrs())
        vcpu.set_fpu(Fpu())
        lapic = vcpu.get_lapic()
        lapic.set(Lapic.LVT_LINT0, APIC_MODE_EXTINT << 8)
        lapic.set(Lapic.LVT_LINT1, APIC_MODE_NMI << 8)
        vcpu.set_lapic(lapic)

    def _load_linux(self) -> None:
        from hvkit.boot.linux import load_linux
        self.cmdline = self.profile.apply_cmdline(self.cmdline)
        self.linux = lb = load_linux(self.memory, self.kernel, self.cmdline, self.initrd,
                                     e820_map(self.memory), boot=self.boot_method)
        for vcpu in self.vcpus:
            self._setup_cpu(vcpu)
        # The boot vCPU starts at the kernel's entry; the others wait for
        # the kernel's INIT/SIPI, as on a PC.
        mode = "long" if lb.mode == "long64" else "protected"
        setup_mode(self.vcpus[0], self.memory, mode, lb.entry, regs=lb.regs)

    def _load_elf(self) -> None:
        image = self.image
        image.load(self.memory)
        self.memory.write(layout.GUEST_ARGS_ADDR, self.args.encode() + b"\0")
        for vcpu in self.vcpus:
            self._setup_cpu(vcpu)
            stack = layout.BOOT_STACK_TOP - vcpu.id * layout.BOOT_STACK_SIZE
            setup_mode(vcpu, self.memory, "long", image.entry, stack=stack,
                       regs={"rdi": vcpu.id, "rsi": self.nr_vcpus,
                             "rdx": layout.GUEST_ARGS_ADDR},
                       write_tables=vcpu.id == 0)
            if vcpu.id:
                # Freestanding guests start every vCPU at the entry point.
                vcpu.set_mp_state(MP_STATE_RUNNABLE)

    # -- running -------------------------------------------------------------
    def start(self) -> "MicroVM":
        if self.state != "created":
            raise HvkitError(f"cannot start a VM that is {self.state}")
        if self.linux is not None:
            # Written last, so it lists the PCI devices added after construction.
            write_mptable(self.memory, self.nr_vcpus, pci_irqs=self.pci_irqs)
        for hook in list(self.before_start):
            hook(self)
        _install_kick()
        self.state = "running"
        self.started_at = time.monotonic()
        for vcpu in self.vcpus:
            t = threading.Thread(target=self._vcpu_thread, args=(vcpu,),
                                 name=f"hvkit-vcpu{vcpu.id}", daemon=True)
            self._threads.append(t)
        for t in self._threads:
            t.start()
        return self

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the guest to stop; returns its exit code or raises the
        error that stopped it (GuestCrash, a device's exception)."""
        if not self._finished.wait(timeout):
            self.stop()
            raise GuestTimeout(f"guest did not finish within {timeout} s; console so far:\n"
                               + self.console_output.decode(errors="replace")[-2000:])
        for t in self._threads:
            t.join()
        self.state = "stopped"
        self._run_after_stop()
        if self.error is not None:
            raise self.error
        return self.exit_code if self.exit_code is not None else 0

    def run(self, timeout: float | None = None) -> int:
        """Start the guest and wait for it to finish."""
        self.start()
        return self.wait(timeout)

    def pause(self, timeout: float = 5.0) -> None:
        """Stop every vCPU between exits; returns when all are parked."""
        with self._cond:
            if self.state != "running":
                raise HvkitError(f"cannot pause a VM that is {self.state}")
            self._pause_requested = True
        for vcpu in self.vcpus:
            vcpu.kick()
        with self._cond:
            ok = self._cond.wait_for(lambda: self._paused + self._exited() == len(self._threads)
                                     or self._finished.is_set(), timeout)
            if not ok:
                raise GuestTimeout(f"vCPUs did not pause within {timeout} s")
            if not self._finished.is_set():
                self.state = "paused"

    def resume(self) -> None:
        with self._cond:
            if self.state != "paused":
                raise HvkitError(f"cannot resume a VM that is {self.state}")
            self._pause_requested = False
            self.state = "running"
            self._cond.notify_all()

    def stop(self) -> None:
        """Stop the VM from any thread (the exit code stays unset)."""
        self._finish("stopped", None)
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(5)

    def send_input(self, data: bytes | str) -> None:
        """Type into the guest's serial console."""
        self.serial.feed(data.encode() if isinstance(data, str) else data)

    @property
    def stopping(self) -> bool:
        """True once the VM has begun to stop (guest exit, error, stop())."""
        return self._stopping

    @property
    def finished(self) -> threading.Event:
        """Set when the VM has stopped running guest code."""
        return self._finished

    @property
    def console_output(self) -> bytes:
        return self.console.getvalue()

    def _run_after_stop(self) -> None:
        hooks, self.after_stop = list(self.after_stop), []
        for hook in hooks:
            hook(self)

    def _exited(self) -> int:
        return sum(1 for t in self._threads if not t.is_alive())

    def _python_exit(self, code: int) -> None:
        self._finish("exit", code)

    def _finish(self, reason: str, code: int | None, error: BaseException | None = None) -> None:
        with self._cond:
            if not self._stopping:
                self._stopping = True
                self.exit_reason = reason
                self.exit_code = code
                self.error = error
            self._cond.notify_all()
        self._finished.set()
        for vcpu in self.vcpus:
            if vcpu.runner is not None:
                vcpu.kick()

    def _vcpu_thread(self, vcpu: Vcpu) -> None:
        try:
            self._vcpu_loop(vcpu)
        except BaseException as exc:  # any failure stops the whole VM
            self._finish("error", None, exc)
        finally:
            with self._cond:
                self._cond.notify_all()

    def _vcpu_loop(self, vcpu: Vcpu) -> None:
        runner = vcpu.runner
        io_bus, mmio_bus = self.io_bus, self.mmio_bus
        run = runner.run
        RUN_EXIT, RUN_INTR = _native.RUN_EXIT, _native.RUN_INTERRUPTED
        IO, MMIO = ExitReason.IO, ExitReason.MMIO
        while True:
            rc = run()
            if rc == RUN_EXIT:
                reason = runner.exit_reason
                if reason == IO:
                    runner.serve_io(io_bus)
                elif reason == MMIO:
                    runner.serve_mmio(mmio_bus)
                else:
                    self._other_exit(vcpu, reason)
                if self._stopping:
                    return
            elif rc == RUN_INTR:
                runner.immediate_exit = 0
                if self._stopping:
                    return
                if self._pause_requested:
                    self._park()
                    if self._stopping:
                        return
            else:  # the guest wrote the exit port
                native = self.vm.native
                self._finish("exit", native.exit_code)
                return

    def _park(self) -> None:
        with self._cond:
            self._paused += 1
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._pause_requested or self._stopping)
            self._paused -= 1

    def _other_exit(self, vcpu: Vcpu, reason: int) -> None:
        ex = decode(vcpu.runner, reason)
        if reason == ExitReason.SHUTDOWN:
            raise self._crash(vcpu, "triple fault (KVM_EXIT_SHUTDOWN)")
        if reason == ExitReason.FAIL_ENTRY:
            raise self._crash(vcpu, "VM entry failed",
                              f"hardware reason {ex.hardware_entry_failure_reason:#x}",
                              {"hardware_entry_failure_reason": ex.hardware_entry_failure_reason})
        if reason == ExitReason.INTERNAL_ERROR:
            raise self._crash(vcpu, f"KVM internal error ({ex.suberror_name})",
                              "data " + " ".join(f"{d:#x}" for d in ex.data),
                              {"suberror": ex.suberror, "data": ex.data})
        if reason == ExitReason.SYSTEM_EVENT:
            self._finish(f"system event {ex.type_name.lower()}", 0)
            return
        if reason == ExitReason.HLT:
            # Without an in-kernel irqchip a halted vCPU would never wake.
            raise self._crash(vcpu, "vCPU halted with no way to wake it")
        raise self._crash(vcpu, f"unhandled exit {ex.reason!r}", repr(ex))

    def _crash(self, vcpu: Vcpu, reason: str, message: str = "",
               data: dict | None = None) -> GuestCrash:
        try:
            regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        except HvkitError:
            regs = sregs = None
        return GuestCrash(reason, message, regs, sregs, data, vcpu.id)

    def exit_counts(self) -> dict[str, int]:
        """VM exits by reason over all vCPUs ("native" counts the ones C served)."""
        out: dict[str, int] = {}
        for vcpu in self.vcpus:
            if vcpu.runner is None:
                continue
            for reason, n in vcpu.runner.exit_counts().items():
                try:
                    name = ExitReason(reason).name
                except ValueError:
                    name = str(reason)
                out[name] = out.get(name, 0) + n
            out["native"] = out.get("native", 0) + vcpu.runner.native_exits
        return out

    def kvm_exits(self) -> int:
        """Every exit of every vCPU as KVM counts it, including the ones the
        kernel serves itself (ioeventfd, in-kernel APIC and PIT)."""
        return sum(int(v.stats().get("exits", 0)) for v in self.vcpus if v.fd >= 0)

    # -- teardown ------------------------------------------------------------
    def close(self, wait: bool = True) -> None:
        """Stop the VM if it runs and release everything it holds. With
        ``wait=False`` the kernel-side teardown finishes in the background
        (see ``wait_for_closes``)."""
        global _reaper
        if self._closed:
            return
        self._closed = True
        if self._threads and any(t.is_alive() for t in self._threads):
            self.stop()
        self._run_after_stop()
        items: list[object] = []
        for att in self._attachments:
            att.close()
        self._attachments.clear()
        if self.vm is not None:
            items.append(self.vm)
            self.vm = None
        items.append(self.memory)
        self.state = "closed"
        if wait:
            for item in items:
                item.close()
        else:
            with _kick_lock:
                if _reaper is None:
                    _reaper = _Reaper()
            _reaper.put(items)

    def __enter__(self) -> "MicroVM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def run_guest(guest: str, *, timeout: float | None = 30, **kwargs: Any) -> tuple[int, bytes]:
    """Boot ``guest`` and return (exit code, console output)."""
    with MicroVM(guest, **kwargs) as vm:
        code = vm.run(timeout)
        return code, vm.console_output


