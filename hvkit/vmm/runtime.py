"""The running VM: vCPU threads, exit dispatch, lifecycle and teardown.

The builder (hvkit.vmm.builder) fills a ``Vmm`` with guest RAM, KVM objects,
buses and devices; from then on this object owns them. vCPU threads spend
their time in the native loop and enter Python only for exits no native
device absorbs. Everything that attaches to the VM (hvkit.vmm.attach) goes
through the public methods here.
"""
from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from hvkit import _native
from hvkit.devices.bus import Bus, Device
from hvkit.devices.exit_port import NullPorts
from hvkit.errors import ConfigError, GuestCrash, GuestTimeout, HvkitError
from hvkit.kvm.caps import ExitReason
from hvkit.kvm.exits import decode
from hvkit.vmm.attach import Attachment
from hvkit.vmm.config import VmConfig, check_timeout
from hvkit.vmm.reaper import reap

if TYPE_CHECKING:
    from hvkit.boot.linux import LinuxBoot
    from hvkit.devices.hypercall import HypercallPort
    from hvkit.devices.i8042 import I8042
    from hvkit.devices.pci.device import PciDevice
    from hvkit.devices.rtc import CmosRtc
    from hvkit.devices.serial import Serial16550
    from hvkit.kvm.system import Kvm
    from hvkit.kvm.vcpu import Vcpu
    from hvkit.kvm.vm import Vm
    from hvkit.memory.guest import GuestMemory
    from hvkit.vmm.pci import PciPlatform

#: VM states, in lifecycle order
STATES = ("created", "starting", "running", "paused", "stopped", "closed")

_kick_lock = threading.Lock()
_kick_installed = False


def _install_kick() -> None:
    global _kick_installed
    with _kick_lock:
        if not _kick_installed:
            _native.install_kick_signal()
            _kick_installed = True


class Vmm:
    """A built VM and its lifecycle: start, pause, resume, stop, wait, close.

    ``state`` is one of STATES. Once the vCPUs stop, ``exit_reason`` says
    why: "exit" (the guest wrote the exit port; ``exit_code`` holds its
    code), "reset", "system event ...", "error" and "crash" (``error`` holds
    the exception), "timeout", or "stopped" (the host called ``stop()``).
    """

    def __init__(self, config: VmConfig, kvm: "Kvm | None" = None) -> None:
        """An unbuilt VM; ``hvkit.vmm.builder.build`` fills it (and opens
        /dev/kvm if ``kvm`` is None, after the guest image is read)."""
        self.config = config
        self.kvm = kvm
        self.vm: "Vm | None" = None
        self.memory: "GuestMemory | None" = None
        self.vcpus: list["Vcpu"] = []
        self.io_bus = Bus("port-io")
        self.io_bus.unregister_listeners.append(self._port_unregistered)
        self.mmio_bus = Bus("mmio")
        self.console = _native.ConsoleSink()
        self.serial: "Serial16550 | None" = None
        self.hypercalls: "HypercallPort | None" = None
        self.i8042: "I8042 | None" = None
        self.rtc: "CmosRtc | None" = None
        self.pci: "PciPlatform | None" = None
        self.linux: "LinuxBoot | None" = None
        self.cmdline: str | None = None
        #: seconds each build phase took (memory, vm, platform, vcpus, load)
        self.timings: dict[str, float] = {}
        #: called with the VM just before its vCPUs start, and after they stop
        self.before_start: list[Callable[[Any], None]] = []
        self.after_stop: list[Callable[[Any], None]] = []
        #: called as (device, bar index, old address, new address) when a BAR moves
        self.bar_listeners: list[Callable[["PciDevice", int, int | None, int | None], None]] = []

        self.state = "created"
        self.exit_code: int | None = None
        self.exit_reason: str | None = None
        self.error: BaseException | None = None
        self.started_at = 0.0
        self._attachments: list[Attachment] = []
        self._native_ports: dict[tuple[int, int], Device] = {}
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._stopping = False
        self._pause_requested = False
        self._paused = 0
        self._finished = threading.Event()
        self._after_stop_done = False

    # -- attachments and devices ------------------------------------------------
    def attach(self, attachment: Attachment) -> Attachment:
        """Add a device or service; it takes its resources from this VM now
        and hears every later lifecycle event. Returns it."""
        if self.state == "closed":
            raise HvkitError("cannot attach to a closed VM")
        if any(a.name == attachment.name and a.name != Attachment.name
               for a in self._attachments):
            raise ConfigError(f"an attachment named {attachment.name!r} is already attached")
        attachment.on_attach(self)
        self._attachments.append(attachment)
        if self.state in ("running", "paused"):
            attachment.on_start()
        return attachment

    @property
    def attachments(self) -> tuple[Attachment, ...]:
        return tuple(self._attachments)

    def add_device(self, bus: Bus, base: int, length: int, device: Device,
                   name: str | None = None) -> None:
        """Put a device on a bus. On the port bus, a device that can be
        served in C is registered with the run loop; any other is called
        from inside the run loop (the vCPU takes the GIL for the call and
        goes straight back to the guest), which is the bus's dispatch
        without the trip out of the loop."""
        mapping = bus.register(base, length, device, name)
        if not self.config.native_devices or bus is not self.io_bus:
            return
        attach = getattr(device, "attach_native", None)
        if attach is not None:
            args = (base, length) if isinstance(device, NullPorts) else (base,)
            if attach(self.vm.native, *args):
                self._native_ports[(base, length)] = device
            return
        try:
            self.vm.native.add_python_port(base, length, device, mapping.lock, mapping.name)
        except ValueError:
            return          # the run loop's table is full: the bus serves it
        self._native_ports[(base, length)] = device

    def remove_device(self, bus: Bus, device: Device, base: int | None = None) -> None:
        """Take a device off a bus (``bus.unregister`` does the same): a port
        served in C stops answering there too."""
        bus.unregister(device, base)

    def _port_unregistered(self, mapping: Any) -> None:
        key = (mapping.base, mapping.length)
        if self._native_ports.get(key) is mapping.device and self.vm is not None:
            self.vm.native.remove_ports(mapping.base, mapping.length)
            del self._native_ports[key]

    def add_pci_device(self, device: "PciDevice", slot: int | None = None) -> int:
        """Plug a PCI function into bus 0 (see hvkit.vmm.pci); returns its devfn."""
        if self.state != "created":
            raise HvkitError("PCI devices are added before the VM starts")
        if self.pci is None:
            from hvkit.vmm.pci import PciPlatform
            self.pci = PciPlatform(self)
        return self.pci.add(device, slot)

    @property
    def pci_irqs(self) -> list[tuple[int, int, int]]:
        """(slot, pin, GSI) of every PCI function's INTx, for the MP table."""
        return self.pci.irqs if self.pci is not None else []

    def request_exit(self, code: int, reason: str = "exit") -> None:
        """End the VM as if the guest had exited with ``code``: for devices
        that stop the machine (a reset line, a power button, a test device)."""
        self._finish(reason, code)

    # -- running -------------------------------------------------------------
    def start(self) -> "Vmm":
        with self._lock:
            if self.state != "created":
                raise HvkitError(f"cannot start a VM that is {self.state}")
            if self._stopping:
                raise HvkitError("cannot start a VM that was stopped")
            self.state = "starting"
        try:
            if self.linux is not None:
                # Written last, so it lists the PCI devices added after building.
                from hvkit.arch.x86.mptable import write_mptable
                write_mptable(self.memory, len(self.vcpus), pci_irqs=self.pci_irqs)
            for hook in list(self.before_start):
                hook(self)
            for att in self._attachments:
                att.on_start()
            _install_kick()
        except BaseException:
            self.state = "created"
            raise
        with self._lock:
            self.state = "running"
            self.started_at = time.monotonic()
            if self._stopping:          # stop() came while we were getting ready
                self.state = "stopped"
                return self
            for vcpu in self.vcpus:
                t = threading.Thread(target=self._vcpu_thread, args=(vcpu,),
                                     name=f"hvkit-vcpu{vcpu.id}", daemon=True)
                self._threads.append(t)
                t.start()
        return self

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the VM to stop. Returns the guest's exit code; None if
        the host stopped it (``stop()``); raises the error that stopped it
        (GuestCrash, a device's exception) or GuestTimeout (the VM is then
        stopped). ``timeout`` in seconds; None or 0: no limit."""
        self._check_open("wait for")
        timeout = check_timeout(timeout)
        if self.state == "created":
            raise HvkitError("the VM has not been started: call start() before wait(), "
                             "or run()")
        if not self._finished.wait(timeout):
            self._finish("timeout", None, GuestTimeout(
                f"guest did not finish within {timeout:g} s; console so far:\n"
                + self.console_output.decode(errors="replace")[-2000:]))
        self._join()
        self.state = "stopped"
        self._run_after_stop()
        if self.error is not None:
            raise self.error
        return self.exit_code

    def run(self, timeout: float | None = None) -> int | None:
        """Start the guest and wait for it to finish (see ``wait``)."""
        timeout = check_timeout(timeout)
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
                self._pause_requested = False
                self._cond.notify_all()
                raise GuestTimeout(f"vCPUs did not pause within {timeout} s")
            if self._finished.is_set():
                return
            self.state = "paused"
        for att in self._attachments:
            att.on_pause()

    def resume(self) -> None:
        with self._cond:
            if self.state != "paused":
                raise HvkitError(f"cannot resume a VM that is {self.state}")
        for att in self._attachments:
            att.on_resume()
        with self._cond:
            self._pause_requested = False
            self.state = "running"
            self._cond.notify_all()

    def stop(self) -> None:
        """Stop the VM from any thread; it then reports exit_reason "stopped"
        (and no exit code) unless the guest had already finished."""
        self._check_open("stop")
        self._finish("stopped", None)
        self._join(5)
        with self._lock:
            if self.state in ("created", "starting", "running", "paused"):
                self.state = "stopped"
        self._run_after_stop()

    def send_input(self, data: bytes | str, timeout: float | None = None) -> int:
        """Type into the guest's serial console. Blocks while the UART's
        input buffer is full (back-pressure, up to ``timeout`` s); returns
        how many bytes were taken."""
        self._check_open("send input to")
        if self.serial is None:
            raise HvkitError("this VM has no serial port")
        raw = data.encode() if isinstance(data, str) else bytes(data)
        return self.serial.feed(raw, timeout=timeout)

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

    def _check_open(self, what: str) -> None:
        if self.state == "closed":
            raise HvkitError(f"cannot {what} a closed VM")

    def _join(self, timeout: float | None = None) -> None:
        me = threading.current_thread()
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            if t is not me and t.ident is not None:
                t.join(timeout)

    def _run_after_stop(self) -> None:
        with self._lock:
            if self._after_stop_done or self.state not in ("stopped", "closed"):
                return
            self._after_stop_done = True
        hooks, self.after_stop = list(self.after_stop), []
        for hook in hooks:
            hook(self)
        for att in reversed(self._attachments):
            att.on_stop()

    def _exited(self) -> int:
        return sum(1 for t in self._threads if not t.is_alive())

    def _finish(self, reason: str, code: int | None, error: BaseException | None = None) -> None:
        with self._cond:
            if not self._stopping:
                self._stopping = True
                self.exit_reason = reason
                self.exit_code = code
                self.error = error
            self._cond.notify_all()
        self._finished.set()
        if self.serial is not None:
            self.serial.close()       # a send_input waiting for room must not wait on a dead guest
        for vcpu in self.vcpus:
            if vcpu.runner is not None:
                vcpu.kick()

    def _vcpu_thread(self, vcpu: "Vcpu") -> None:
        try:
            self._vcpu_loop(vcpu)
        except GuestCrash as exc:
            if exc.regs is None:
                try:
                    exc = exc.with_registers(vcpu.get_regs(), vcpu.get_sregs())
                except HvkitError:
                    pass
            self._finish("crash", None, exc.with_traceback(None))
        except BaseException as exc:  # any failure stops the whole VM
            self._finish("error", None, exc)
        finally:
            with self._cond:
                self._cond.notify_all()

    def _vcpu_loop(self, vcpu: "Vcpu") -> None:
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
            else:  # the guest wrote the exit port (served in C)
                self._finish("exit", self.vm.native.exit_code)
                return

    def _park(self) -> None:
        with self._cond:
            self._paused += 1
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._pause_requested or self._stopping)
            self._paused -= 1

    def _other_exit(self, vcpu: "Vcpu", reason: int) -> None:
        ex = decode(vcpu.runner, reason)
        if reason == ExitReason.SHUTDOWN:
            raise self._crash(vcpu, "triple fault (KVM_EXIT_SHUTDOWN)")
        if reason == ExitReason.FAIL_ENTRY:
            raise self._crash(vcpu, "VM entry failed",
                              f"hardware reason {ex.hardware_entry_failure_reason:#x}",
                              {"hardware_entry_failure_reason": ex.hardware_entry_failure_reason})
        if reason == ExitReason.INTERNAL_ERROR:
            detail = "data " + " ".join(f"{d:#x}" for d in ex.data)
            if ex.insn_bytes:
                detail += f"; instruction bytes {ex.instruction}"
            raise self._crash(vcpu, f"KVM internal error ({ex.suberror_name})", detail,
                              {"suberror": ex.suberror, "data": ex.data,
                               "instruction": ex.insn_bytes})
        if reason == ExitReason.SYSTEM_EVENT:
            self._finish(f"system event {ex.type_name.lower()}", 0)
            return
        if reason == ExitReason.HLT:
            # Without an in-kernel irqchip a halted vCPU would never wake.
            raise self._crash(vcpu, "vCPU halted with no way to wake it")
        raise self._crash(vcpu, f"unhandled exit {ex.reason!r}", repr(ex))

    def _crash(self, vcpu: "Vcpu", reason: str, message: str = "",
               data: dict | None = None) -> GuestCrash:
        try:
            regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        except HvkitError:
            regs = sregs = None
        return GuestCrash(reason, message, regs, sregs, data, vcpu.id)

    # -- statistics ------------------------------------------------------------
    def exit_counts(self) -> dict[str, int]:
        """VM exits by reason over all vCPUs ("native" counts the ones C
        served, "python_port" the ones Python ports served from inside the
        run loop)."""
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
            out["python_port"] = out.get("python_port", 0) + vcpu.runner.callback_exits
        return out

    def kvm_exits(self) -> int:
        """Every exit of every vCPU as KVM counts it, including the ones the
        kernel serves itself (ioeventfd, in-kernel APIC and PIT)."""
        return sum(int(v.stats().get("exits", 0)) for v in self.vcpus if v.fd >= 0)

    # -- teardown ------------------------------------------------------------
    def close(self, wait: bool = True) -> None:
        """Stop the VM if it runs and release everything it holds, at once
        and on every path. With ``wait=False`` the kernel-side teardown
        finishes in the background (see ``hvkit.vmm.reaper.wait_for_closes``)."""
        if self.state == "closed":
            return
        if self._threads and any(t.is_alive() for t in self._threads):
            self._finish("stopped", None)
            self._join(5)
        with self._lock:
            self.state = "stopped" if self.state != "created" else self.state
        if self.state == "stopped":
            self._run_after_stop()
        self.state = "closed"
        errors: list[BaseException] = []
        for att in reversed(self._attachments):
            try:
                att.close()
            except Exception as exc:  # close the rest, then report
                errors.append(exc)
        self._attachments.clear()
        closer = getattr(self.serial, "close", None)
        if closer is not None:
            closer()
        items: list[Any] = []
        if self.vm is not None:
            items.append(self.vm)
            self.vm = None
        self.vcpus = []
        if self.memory is not None:
            items.append(self.memory)
        # A crash's traceback holds the vCPU loop's frames; drop them so
        # nothing keeps the kernel's VM alive after close.
        if self.error is not None:
            self.error.__traceback__ = None
        reap(items, wait)
        if errors:
            raise errors[0]

    def __enter__(self) -> "Vmm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

