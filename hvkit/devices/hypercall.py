"""The hypercall channel: a reserved I/O port instead of ``vmcall``.

``vmcall`` hangs KVM_RUN on some nested hosts, and a port write works at
any privilege level the guest grants. The guest writes the guest-physical
address of a 64-byte block (u64 nr, u64 args[6], u64 ret) to the port as a
32-bit value; hvkit runs the registered handler and stores its result in
``ret``. All of the block is guest data: the handler gets plain integers.
"""
from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from hvkit.errors import ConfigError, GuestCrash, GuestMemoryError

from hvkit.vmm.attach import Attachment

if TYPE_CHECKING:
    from hvkit.memory.guest import GuestMemory
    from hvkit.vmm.runtime import Vmm

BLOCK = struct.Struct("<Q6QQ")
BLOCK_SIZE = BLOCK.size

# Hypercall numbers hvkit itself defines; users register from 0x1000 up.
HC_FAULT = 1         # the guest runtime reports an exception it cannot handle
HC_PUTS = 2          # args: gpa, length: write guest bytes to the console
USER_BASE = 0x1000
MAX_NR = (1 << 64) - 1

#: The one table of hypercall numbers: (first, last, owner, what). Numbers
#: are per VM; a service registers inside its owner's range (``owner=``),
#: and ``register`` refuses a number that is taken.
RANGES: tuple[tuple[int, int, str, str], ...] = (
    (0x0000, 0x0FFF, "hvkit", "the guest runtime's own calls (fault, puts)"),
    (0x1000, 0x10FF, "user", "free for users' own services"),
    (0x1100, 0x113F, "dedup", "selective dedup (hvkit.memory.dedup)"),
    (0x1150, 0x115F, "time", "guest-time probes (hvkit.time.probe)"),
    (0x11F0, 0x11FF, "gate", "host/guest sync points (hvkit.memory.dedup.GuestGate)"),
    (0x1200, 0x12FF, "nvme-bench", "the NVMe benchmark guest"),
    (0x1300, 0x13FF, "integrity", "kernel code integrity"),
    (0x1400, 0x14FF, "virtio", "virtio guest drivers' benchmarks"),
    (0x2000, MAX_NR, "user", "free for users' own services"),
)


def owner_of(nr: int) -> str | None:
    """Which part of hvkit a hypercall number belongs to (None: unassigned)."""
    for first, last, owner, _ in RANGES:
        if first <= nr <= last:
            return owner
    return None

EXCEPTIONS = {0: "#DE divide error", 1: "#DB debug", 2: "NMI", 3: "#BP breakpoint",
              4: "#OF overflow", 5: "#BR bound range", 6: "#UD invalid opcode",
              7: "#NM device not available", 8: "#DF double fault", 10: "#TS invalid TSS",
              11: "#NP segment not present", 12: "#SS stack fault",
              13: "#GP general protection", 14: "#PF page fault", 16: "#MF x87 error",
              17: "#AC alignment check", 18: "#MC machine check", 19: "#XM SIMD error"}


class HypercallError(Exception):
    """Raised by a handler to fail a call with an errno (returned as -errno)."""

    def __init__(self, err: int, message: str = "") -> None:
        super().__init__(message or errno.errorcode.get(err, str(err)))
        self.errno = err


@dataclass
class Call:
    nr: int
    args: tuple[int, ...]
    gpa: int


Handler = Callable[[Call], int]


class HypercallPort(Attachment):
    """The hypercall port device and the VM's registry of handlers."""

    name = "hypercall"

    def __init__(self, memory: "GuestMemory", port: int | None = None) -> None:
        self.memory = memory
        self.port = port
        self.handlers: dict[int, tuple[str, Handler]] = {}
        self.calls = 0
        self.register(HC_FAULT, self._fault, "fault")

    def on_attach(self, vmm: "Vmm") -> None:
        if self.port is not None:
            vmm.add_device(vmm.io_bus, self.port, 4, self, "hypercall")

    def state(self) -> dict:
        """The registered numbers and names: a restored VM must answer the
        same hypercalls."""
        return {"calls": self.calls,
                "handlers": {f"{nr:#x}": name for nr, (name, _) in sorted(self.handlers.items())}}

    def restore(self, state: dict) -> None:
        want = state.get("handlers", {})
        have = {f"{nr:#x}": name for nr, (name, _) in self.handlers.items()}
        missing = sorted(set(want) - set(have))
        if missing:
            raise ConfigError("hypercalls " + ", ".join(f"{k} ({want[k]})" for k in missing)
                              + " were registered when the state was saved and are not now")
        self.calls = int(state.get("calls", 0))

    def register(self, nr: int, handler: Handler, name: str = "",
                 owner: str | None = None) -> None:
        """Answer hypercall ``nr`` with ``handler(call) -> int``. With
        ``owner``, ``nr`` must lie in that owner's range of ``RANGES``."""
        if isinstance(nr, bool) or not isinstance(nr, int) or not 0 <= nr <= MAX_NR:
            raise ConfigError(f"hypercall number {nr!r} is not an integer in 0..2**64-1")
        if not callable(handler):
            raise ConfigError(f"hypercall {nr:#x}: handler {handler!r} is not callable")
        if owner is not None and owner_of(nr) != owner:
            raise ConfigError(f"hypercall {nr:#x} is not in the range of {owner!r} "
                              f"(it belongs to {owner_of(nr)!r}; see hvkit.devices.hypercall.RANGES)")
        if nr in self.handlers:
            raise ConfigError(f"hypercall {nr:#x} is already registered "
                              f"({self.handlers[nr][0]})")
        self.handlers[nr] = (name or getattr(handler, "__name__", "handler"), handler)

    def unregister(self, nr: int) -> None:
        self.handlers.pop(nr, None)

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        gpa = int.from_bytes(data[:4], "little")
        try:
            nr, *rest = BLOCK.unpack(self.memory.read(gpa, BLOCK_SIZE))
        except GuestMemoryError:
            return  # the guest gave a bad address: nothing to answer into
        self.calls += 1
        entry = self.handlers.get(nr)
        if entry is None:
            ret = -errno.ENOSYS
        else:
            try:
                ret = entry[1](Call(nr, tuple(rest[:6]), gpa))
            except HypercallError as exc:
                ret = -exc.errno
            except GuestMemoryError:
                ret = -errno.EFAULT
        self.memory.write_u64(gpa + 56, (ret or 0) & 0xFFFFFFFFFFFFFFFF)

    @staticmethod
    def _fault(call: Call) -> int:
        vector, error_code, rip, cr2, rsp, cpu = call.args
        name = EXCEPTIONS.get(vector, f"vector {vector}")
        detail = f"{name} at rip={rip:#x} error_code={error_code:#x} rsp={rsp:#x}"
        if vector == 14:
            detail += f" cr2={cr2:#x}"
        raise GuestCrash("guest exception", detail, vcpu=cpu,
                         data={"vector": vector, "error_code": error_code, "rip": rip,
                               "cr2": cr2, "rsp": rsp})
