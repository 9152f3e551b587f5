"""The plain description of a microVM: what to boot, how big, which ports.

A ``VmConfig`` is checked completely when it is made (every field, its
type and how the fields fit together), so a bad value is refused with a
``ConfigError`` naming the field before any KVM object exists. It holds no
KVM state and round-trips through JSON (``hvkit run --config FILE``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from hvkit.arch.x86 import layout
from hvkit.errors import ConfigError
from hvkit.sizes import parse_size

#: vCPUs a VM may have: KVM ids, CPUID topology and the MP table hold 64
MAX_VCPUS = 64
#: vCPUs the freestanding guest runtime holds (MAX_CPUS in guests/runtime/hvkit.h;
#: its per-vCPU boot stacks sit below layout.BOOT_STACK_TOP)
MAX_FREESTANDING_VCPUS = 16
MIN_MEMORY = 2 << 20
#: guest RAM above this would not fit the guest-physical address space KVM
#: gives a microVM here (1 TiB; the 32-bit PCI hole is added on top)
MAX_MEMORY = 1 << 40
BOOT_METHODS = ("auto", "pvh", "bzimage")
HOST_PROFILES = ("auto", "pvm", "none")
MEMORY_BACKINGS = ("memfd", "anonymous")
ENTRY_MODES = ("real", "protected", "long")
SECONDARY_START = ("entry", "wait-sipi")


def check_timeout(value: Any, what: str = "timeout") -> float | None:
    """Seconds to wait, or None for no limit.

    0 and None mean no limit; a negative, NaN or infinite value is refused
    (an infinite wait is spelt None or 0)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{what} must be a number of seconds, not {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise ConfigError(f"{what} {value} is not a time: give seconds >= 0 "
                          "(0 or none: no limit)")
    return value or None


def _check_type(name: str, value: Any, types: type | tuple[type, ...], what: str) -> None:
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ConfigError(f"{name} must be {what}, not bool")
    if not isinstance(value, types):
        raise ConfigError(f"{name} must be {what}, not {type(value).__name__}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} {value!r} is not one of {', '.join(choices)}")


def _check_path(name: str, value: Any, allow_bytes: bool = False) -> None:
    types: tuple[type, ...] = (str, os.PathLike) + ((bytes, bytearray, memoryview)
                                                     if allow_bytes else ())
    if not isinstance(value, types):
        raise ConfigError(f"{name} must be a path{' or bytes' if allow_bytes else ''}, "
                          f"not {type(value).__name__}")
    if isinstance(value, (str, os.PathLike)) and not os.fspath(value):
        raise ConfigError(f"{name} is an empty path")


@dataclass(frozen=True)
class PortMap:
    """Where the legacy platform's I/O ports sit; None leaves a device out.

    The bundled freestanding guests expect the defaults (exit 0x500,
    hypercall 0x510). A VMM that loads firmware may move the hypercall
    port away from 0x510, where firmware config interfaces live."""

    serial: int | None = layout.COM1_PORT
    exit: int | None = layout.EXIT_PORT
    hypercall: int | None = layout.HYPERCALL_PORT
    i8042: int | None = layout.I8042_DATA_PORT
    rtc: int | None = layout.RTC_PORT
    post: int | None = layout.POST_PORT
    pit: bool = True

    #: port span of each device
    SPANS = {"serial": 8, "exit": 4, "hypercall": 4, "i8042": 5, "rtc": 2, "post": 1}

    def __post_init__(self) -> None:
        taken: list[tuple[int, int, str]] = []
        for name, span in self.SPANS.items():
            port = getattr(self, name)
            if port is None:
                continue
            _check_type(f"ports.{name}", port, int, "an I/O port number or null")
            if not 0 <= port <= 0xFFFF - span + 1:
                raise ConfigError(f"ports.{name} {port:#x} is outside the 64 KiB I/O space")
            for base, end, other in taken:
                if port < end and base < port + span:
                    raise ConfigError(f"ports.{name} at {port:#x} overlaps ports.{other} "
                                      f"at {base:#x}")
            taken.append((port, port + span, name))
        _check_type("ports.pit", self.pit, bool, "true or false")

    def ranges(self) -> list[tuple[str, int, int]]:
        """(device, first port, span) of every device that is present."""
        return [(n, getattr(self, n), s) for n, s in self.SPANS.items()
                if getattr(self, n) is not None]


@dataclass(frozen=True)
class EntryState:
    """Where and how the boot vCPU starts when the caller loads the guest.

    ``regs`` names general registers (rax..r15, rflags); segments, control
    registers and page tables follow from ``mode`` (hvkit.arch.x86.modes)."""

    mode: str = "long"
    rip: int = layout.HIMEM_START
    regs: Mapping[str, int] = field(default_factory=dict)
    stack: int | None = None

    REG_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
                 "r11", "r12", "r13", "r14", "r15", "rflags")

    def __post_init__(self) -> None:
        _check_choice("entry.mode", self.mode, ENTRY_MODES)
        limit = (1 << 20) if self.mode == "real" else (1 << 32) if self.mode == "protected" \
            else (1 << 64)
        for name, value in (("entry.rip", self.rip), ("entry.stack", self.stack)):
            if value is None and name == "entry.stack":
                continue
            _check_type(name, value, int, "an address")
            if not 0 <= value < limit:
                raise ConfigError(f"{name} {value:#x} is not reachable in {self.mode} mode")
        if not isinstance(self.regs, Mapping):
            raise ConfigError(f"entry.regs must be a mapping, not {type(self.regs).__name__}")
        for reg, value in self.regs.items():
            if reg not in self.REG_NAMES:
                raise ConfigError(f"entry.regs: {reg!r} is not one of {', '.join(self.REG_NAMES)}")
            _check_type(f"entry.regs.{reg}", value, int, "an integer")
            if not 0 <= value < 1 << 64:
                raise ConfigError(f"entry.regs.{reg} {value} does not fit 64 bits")
        object.__setattr__(self, "regs", dict(self.regs))


@dataclass(frozen=True)
class VmConfig:
    """Everything a microVM is made from. Sizes are bytes once made
    (strings such as "64M" are read with hvkit.sizes.parse_size; a bare
    number for ``memory`` is MiB, as QEMU's ``-m``)."""

    guest: str | None = None
    kernel: Any = None
    initrd: Any = None
    cmdline: str | None = None
    boot: str = "auto"
    memory: int | str = "64M"
    vcpus: int = 1
    args: str = ""
    hugepages: bool = False
    memory_backing: str = "memfd"
    native_devices: bool = True
    host_profile: Any = "auto"
    ports: PortMap = field(default_factory=PortMap)
    entry: EntryState | None = None
    secondary_vcpus: str | None = None
    timeout: float | None = None

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        if self.guest is not None:
            _check_path("guest", self.guest)
            set_("guest", os.fspath(self.guest))
        if self.kernel is not None:
            _check_path("kernel", self.kernel, allow_bytes=True)
        if self.initrd is not None:
            if self.kernel is None:
                raise ConfigError("initrd goes with a kernel")
            _check_path("initrd", self.initrd, allow_bytes=True)
        if self.cmdline is not None:
            _check_type("cmdline", self.cmdline, str, "a string")
            if self.kernel is None:
                raise ConfigError("cmdline goes with a kernel")
        if self.guest is not None and self.kernel is not None:
            raise ConfigError("give either a freestanding guest or a Linux kernel, not both")
        _check_choice("boot", self.boot, BOOT_METHODS)
        set_("memory", parse_size(self.memory, "memory", bare="M"))
        if self.memory < MIN_MEMORY:
            raise ConfigError(f"memory {self.memory:#x} is below the 2 MiB minimum")
        if self.memory > MAX_MEMORY:
            raise ConfigError(f"memory {self.memory >> 30} GiB is above the "
                              f"{MAX_MEMORY >> 30} GiB a microVM can map")
        if self.memory % 4096:
            raise ConfigError(f"memory {self.memory} is not a multiple of 4 KiB pages")
        _check_type("vcpus", self.vcpus, int, "an integer")
        limit = MAX_FREESTANDING_VCPUS if self.guest is not None else MAX_VCPUS
        if not 1 <= self.vcpus <= limit:
            why = " (the freestanding guest runtime's limit)" if self.guest is not None else ""
            raise ConfigError(f"vcpus must be between 1 and {limit}{why}, got {self.vcpus}")
        _check_type("args", self.args, str, "a string")
        if len(self.args.encode()) >= layout.GUEST_ARGS_MAX:
            raise ConfigError(f"args are {len(self.args.encode())} bytes; "
                              f"the limit is {layout.GUEST_ARGS_MAX - 1}")
        if self.args and self.guest is None:
            raise ConfigError("args go to a freestanding guest (a kernel takes cmdline)")
        for name in ("hugepages", "native_devices"):
            _check_type(name, getattr(self, name), bool, "true or false")
        _check_choice("memory_backing", self.memory_backing, MEMORY_BACKINGS)
        if isinstance(self.host_profile, str):
            _check_choice("host_profile", self.host_profile, HOST_PROFILES)
        elif not hasattr(self.host_profile, "apply_cmdline"):
            raise ConfigError(f"host_profile must be one of {', '.join(HOST_PROFILES)} "
                              f"or a HostProfile, not {type(self.host_profile).__name__}")
        if isinstance(self.ports, Mapping):
            set_("ports", _from_mapping(PortMap, self.ports, "ports"))
        _check_type("ports", self.ports, PortMap, "a PortMap")
        if isinstance(self.entry, Mapping):
            set_("entry", _from_mapping(EntryState, self.entry, "entry"))
        if self.entry is not None:
            _check_type("entry", self.entry, EntryState, "an EntryState")
        if self.secondary_vcpus is not None:
            _check_choice("secondary_vcpus", self.secondary_vcpus, SECONDARY_START)
        set_("timeout", check_timeout(self.timeout))

    # -- derived ----------------------------------------------------------
    @property
    def is_linux(self) -> bool:
        return self.kernel is not None

    @property
    def secondary_start(self) -> str:
        """Freestanding guests start every vCPU at the entry; Linux and
        caller-loaded guests bring them up with INIT/SIPI, as on a PC."""
        if self.secondary_vcpus is not None:
            return self.secondary_vcpus
        return "entry" if self.guest is not None else "wait-sipi"

    # -- JSON -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (bytes, bytearray, memoryview)):
                raise ConfigError(f"{f.name} is given as bytes; a config file needs a path")
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
            if f.name == "host_profile" and not isinstance(value, str):
                raise ConfigError("host_profile is a HostProfile object; a config file "
                                  f"takes one of {', '.join(HOST_PROFILES)}")
            if isinstance(value, (PortMap, EntryState)):
                value = {k.name: getattr(value, k.name) for k in dataclasses.fields(value)}
            out[f.name] = value
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "VmConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"a VM config is a JSON object, not {type(data).__name__}")
        return _from_mapping(cls, data, "config")

    @classmethod
    def from_json(cls, text: str, source: str = "config") -> "VmConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source}: not JSON: {exc.msg} at line {exc.lineno} "
                              f"column {exc.colno}") from None
        return cls.from_dict(data)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "VmConfig":
        from hvkit.files import read_regular
        data = read_regular(path, "config file", limit=1 << 20)
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise ConfigError(f"config file {os.fspath(path)}: not UTF-8 text") from None
        return cls.from_json(text, f"config file {os.fspath(path)}")


def _from_mapping(cls: type, data: Mapping[str, Any], where: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"{where}: unknown field {key!r} (known: {', '.join(sorted(names))})")
    try:
        return cls(**data)
    except TypeError as exc:  # a field of the wrong shape for the constructor
        raise ConfigError(f"{where}: {exc}") from None
