"""A KVM virtual machine: memory slots, interrupt controllers, eventfds."""
from __future__ import annotations

import os
import struct
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from hvkit import _native
from hvkit.errors import ConfigError, KvmError
from hvkit.kvm.caps import Cap

if TYPE_CHECKING:
    from hvkit.kvm.irqchip import IoapicState, PicState, PitState
    from hvkit.kvm.system import Kvm
    from hvkit.kvm.vcpu import Vcpu
    from hvkit.memory.guest import MemoryRegion

IOC = _native.IOCTLS

MEM_LOG_DIRTY_PAGES = 1 << 0
MEM_READONLY = 1 << 1

IOEVENTFD_FLAG_DATAMATCH = 1 << 0
IOEVENTFD_FLAG_PIO = 1 << 1
IOEVENTFD_FLAG_DEASSIGN = 1 << 2
IRQFD_FLAG_DEASSIGN = 1 << 0
IRQFD_FLAG_RESAMPLE = 1 << 1

IRQ_ROUTING_IRQCHIP = 1
IRQ_ROUTING_MSI = 2
IRQCHIP_PIC_MASTER = 0
IRQCHIP_PIC_SLAVE = 1
IRQCHIP_IOAPIC = 2

PIT_SPEAKER_DUMMY = 1

# Addresses the x86 VM needs for its TSS and identity map (3 + 1 pages just
# below the 4 GiB boundary's BIOS area, where no RAM or device lives).
DEFAULT_TSS_ADDR = 0xFFFB_D000
DEFAULT_IDENTITY_MAP_ADDR = 0xFFFB_C000


@dataclass
class Slot:
    slot: int
    gpa: int
    size: int
    hva: int
    flags: int

    @property
    def pages(self) -> int:
        return self.size // 4096


@dataclass(frozen=True)
class GsiRoute:
    gsi: int
    kind: int
    a: int = 0   # irqchip: chip; msi: address_lo
    b: int = 0   # irqchip: pin;  msi: address_hi
    c: int = 0   # msi: data
    flags: int = 0

    def pack(self) -> bytes:
        return struct.pack("<IIII4I16x", self.gsi, self.kind, self.flags, 0,
                           self.a, self.b, self.c, 0)


class Vm:
    """A VM file descriptor. Create with ``Kvm.create_vm()``."""

    def __init__(self, kvm: "Kvm", fd: int) -> None:
        self.kvm = kvm
        self.fd = fd
        self.native = _native.NativeVm()
        self.slots: dict[int, Slot] = {}
        self.vcpus: list["Vcpu"] = []
        self.has_irqchip = False
        self._routes: dict[int, list[GsiRoute]] = {}
        self._next_gsi = 24
        self._lock = threading.Lock()

    # -- capabilities ------------------------------------------------------
    def check_extension(self, cap: Cap | str | int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (some answers are per VM)."""
        c = Cap.parse(cap)
        return _native.ioctl_arg(self.fd, IOC["CHECK_EXTENSION"], int(c),
                                 f"KVM_CHECK_EXTENSION({c.name})")

    def has(self, cap: Cap | str | int) -> bool:
        return self.check_extension(cap) > 0

    def enable_cap(self, cap: Cap | str | int, *args: int, flags: int = 0) -> None:
        c = Cap.parse(cap)
        if len(args) > 4:
            raise ConfigError(f"KVM_ENABLE_CAP takes at most 4 arguments, got {len(args)}")
        a = list(args) + [0] * (4 - len(args))
        buf = bytearray(struct.pack("<II4Q64x", int(c), flags, *a))
        _native.ioctl_buf(self.fd, IOC["ENABLE_CAP"], buf, f"KVM_ENABLE_CAP({c.name})")

    # -- memory ------------------------------------------------------------
    def set_user_memory_region(self, slot: int, gpa: int, size: int, hva: int,
                               flags: int = 0) -> None:
        """Create, change (flags) or delete (size 0) a memory slot."""
        buf = bytearray(struct.pack("<IIQQQ", slot, flags, gpa, size, hva))
        _native.ioctl_buf(self.fd, IOC["SET_USER_MEMORY_REGION"], buf,
                          f"KVM_SET_USER_MEMORY_REGION(slot {slot}, gpa {gpa:#x}, size {size:#x})")
        if size == 0:
            self.slots.pop(slot, None)
        else:
            self.slots[slot] = Slot(slot, gpa, size, hva, flags)

    def map_region(self, region: "MemoryRegion", slot: int | None = None, *,
                   read_only: bool | None = None, log_dirty: bool = False) -> Slot:
        """Give the guest a MemoryRegion as a slot."""
        if slot is None:
            slot = 0
            while slot in self.slots:
                slot += 1
        ro = region.read_only if read_only is None else read_only
        flags = (MEM_READONLY if ro else 0) | (MEM_LOG_DIRTY_PAGES if log_dirty else 0)
        self.set_user_memory_region(slot, region.gpa, region.size, region.hva, flags)
        return self.slots[slot]

    def set_slot_flags(self, slot: int, flags: int) -> None:
        s = self.slots[slot]
        self.set_user_memory_region(slot, s.gpa, s.size, s.hva, flags)

    def delete_slot(self, slot: int) -> None:
        s = self.slots[slot]
        self.set_user_memory_region(slot, s.gpa, 0, s.hva, 0)

    def get_dirty_log(self, slot: int) -> bytearray:
        """The slot's dirty bitmap (bit n = page n), cleared by the call
        unless manual-protect mode is enabled."""
        s = self.slots[slot]
        bitmap = bytearray(((s.pages + 63) // 64) * 8)
        buf = bytearray(struct.pack("<IIQ", slot, 0, _native.buffer_address(bitmap)))
        _native.ioctl_buf(self.fd, IOC["GET_DIRTY_LOG"], buf, f"KVM_GET_DIRTY_LOG(slot {slot})")
        return bitmap

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int,
                        bitmap: bytes | bytearray) -> None:
        """Re-protect the given pages (manual-protect mode)."""
        bm = bytearray(bitmap)
        buf = bytearray(struct.pack("<IIQQ", slot, num_pages, first_page,
                                    _native.buffer_address(bm)))
        _native.ioctl_buf(self.fd, IOC["CLEAR_DIRTY_LOG"], buf,
                          f"KVM_CLEAR_DIRTY_LOG(slot {slot})")

    def set_tss_addr(self, addr: int = DEFAULT_TSS_ADDR) -> None:
        _native.ioctl_arg(self.fd, IOC["SET_TSS_ADDR"], addr, "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, addr: int = DEFAULT_IDENTITY_MAP_ADDR) -> None:
        buf = bytearray(struct.pack("<Q", addr))
        _native.ioctl_buf(self.fd, IOC["SET_IDENTITY_MAP_ADDR"], buf, "KVM_SET_IDENTITY_MAP_ADDR")

    # -- interrupts --------------------------------------------------------
    def create_irqchip(self) -> None:
        """In-kernel PIC, IOAPIC and LAPICs (before any vCPU exists)."""
        _native.ioctl_arg(self.fd, IOC["CREATE_IRQCHIP"], 0, "KVM_CREATE_IRQCHIP")
        self.has_irqchip = True
        # The routing KVM starts with: GSI n to IOAPIC pin n, and to the PICs
        # for n < 16 (the MP table hvkit writes describes the same wiring).
        for pin in range(24):
            routes = [GsiRoute(pin, IRQ_ROUTING_IRQCHIP, IRQCHIP_IOAPIC, pin)]
            if pin < 8:
                routes.append(GsiRoute(pin, IRQ_ROUTING_IRQCHIP, IRQCHIP_PIC_MASTER, pin))
            elif pin < 16:
                routes.append(GsiRoute(pin, IRQ_ROUTING_IRQCHIP, IRQCHIP_PIC_SLAVE, pin - 8))
            self._routes[pin] = routes

    def create_pit2(self, flags: int = 0) -> None:
        buf = bytearray(struct.pack("<I60x", flags))
        _native.ioctl_buf(self.fd, IOC["CREATE_PIT2"], buf, "KVM_CREATE_PIT2")

    def irq_line(self, irq: int, level: bool) -> None:
        buf = bytearray(struct.pack("<II", irq, 1 if level else 0))
        _native.ioctl_buf(self.fd, IOC["IRQ_LINE"], buf, f"KVM_IRQ_LINE({irq})")

    def signal_msi(self, address: int, data: int, flags: int = 0, devid: int = 0) -> int:
        """Inject an MSI; returns >0 if delivered, 0 if the guest blocked it."""
        buf = bytearray(struct.pack("<IIIII12x", address & 0xFFFFFFFF, address >> 32,
                                    data, flags, devid))
        return _native.ioctl_buf(self.fd, IOC["SIGNAL_MSI"], buf, "KVM_SIGNAL_MSI")

    def _commit_routes(self) -> None:
        entries = [r for rs in self._routes.values() for r in rs]
        buf = bytearray(struct.pack("<II", len(entries), 0) + b"".join(r.pack() for r in entries))
        _native.ioctl_buf(self.fd, IOC["SET_GSI_ROUTING"], buf, "KVM_SET_GSI_ROUTING")

    def add_msi_route(self, address: int, data: int, gsi: int | None = None) -> int:
        """Route a GSI to an MSI message (so an irqfd can deliver MSI-X)."""
        with self._lock:
            if gsi is None:
                gsi = self._next_gsi
                self._next_gsi += 1
            self._routes[gsi] = [GsiRoute(gsi, IRQ_ROUTING_MSI, address & 0xFFFFFFFF,
                                          address >> 32, data)]
            self._commit_routes()
        return gsi

    def remove_route(self, gsi: int) -> None:
        with self._lock:
            self._routes.pop(gsi, None)
            self._commit_routes()

    def ioeventfd(self, fd: int, addr: int, length: int, *, pio: bool = False,
                  datamatch: int | None = None, deassign: bool = False) -> None:
        """Signal ``fd`` on a guest write to addr (MMIO or port), with no exit
        to user space."""
        flags = ((IOEVENTFD_FLAG_PIO if pio else 0)
                 | (IOEVENTFD_FLAG_DATAMATCH if datamatch is not None else 0)
                 | (IOEVENTFD_FLAG_DEASSIGN if deassign else 0))
        buf = bytearray(struct.pack("<QQIiI36x", datamatch or 0, addr, length, fd, flags))
        _native.ioctl_buf(self.fd, IOC["IOEVENTFD"], buf,
                          f"KVM_IOEVENTFD({'port' if pio else 'mmio'} {addr:#x}/{length})")

    def irqfd(self, fd: int, gsi: int, *, resample_fd: int | None = None,
              deassign: bool = False) -> None:
        """Raise GSI ``gsi`` whenever ``fd`` (an eventfd) is written."""
        flags = ((IRQFD_FLAG_DEASSIGN if deassign else 0)
                 | (IRQFD_FLAG_RESAMPLE if resample_fd is not None else 0))
        buf = bytearray(struct.pack("<IIII16x", fd, gsi, flags, resample_fd or 0))
        _native.ioctl_buf(self.fd, IOC["IRQFD"], buf, f"KVM_IRQFD(gsi {gsi})")

    def get_irqchip(self, chip_id: int) -> bytes:
        buf = bytearray(_native.SIZES["irqchip"])
        struct.pack_into("<I", buf, 0, chip_id)
        _native.ioctl_buf(self.fd, IOC["GET_IRQCHIP"], buf, f"KVM_GET_IRQCHIP({chip_id})")
        return bytes(buf)

    def set_irqchip(self, state: bytes) -> None:
        _native.ioctl_buf(self.fd, IOC["SET_IRQCHIP"], bytearray(state), "KVM_SET_IRQCHIP")

    def get_pic(self, slave: bool = False) -> "PicState":
        """The in-kernel PIC's state (master, or slave with ``slave=True``)."""
        from hvkit.kvm.irqchip import unpack_irqchip
        return unpack_irqchip(self.get_irqchip(1 if slave else 0))

    def set_pic(self, state: "PicState", slave: bool = False) -> None:
        from hvkit.kvm.irqchip import pack_irqchip
        self.set_irqchip(bytes(pack_irqchip(1 if slave else 0, state)))

    def get_ioapic(self) -> "IoapicState":
        from hvkit.kvm.irqchip import CHIP_IOAPIC, unpack_irqchip
        return unpack_irqchip(self.get_irqchip(CHIP_IOAPIC))

    def set_ioapic(self, state: "IoapicState") -> None:
        from hvkit.kvm.irqchip import CHIP_IOAPIC, pack_irqchip
        self.set_irqchip(bytes(pack_irqchip(CHIP_IOAPIC, state)))

    def get_pit(self) -> "PitState":
        """The in-kernel PIT's three channels and flags."""
        from hvkit.kvm.irqchip import PitState
        return PitState.unpack(self.get_pit2())

    def set_pit(self, state: "PitState") -> None:
        self.set_pit2(state.pack())

    def get_pit2(self) -> bytes:
        buf = bytearray(_native.SIZES["pit_state2"])
        _native.ioctl_buf(self.fd, IOC["GET_PIT2"], buf, "KVM_GET_PIT2")
        return bytes(buf)

    def set_pit2(self, state: bytes) -> None:
        _native.ioctl_buf(self.fd, IOC["SET_PIT2"], bytearray(state), "KVM_SET_PIT2")

    def get_clock(self) -> int:
        buf = bytearray(_native.SIZES["clock_data"])
        _native.ioctl_buf(self.fd, IOC["GET_CLOCK"], buf, "KVM_GET_CLOCK")
        return struct.unpack_from("<Q", buf, 0)[0]

    def set_clock(self, ns: int) -> None:
        """KVM_SET_CLOCK: the kvmclock value (ns) the guest continues from."""
        buf = bytearray(_native.SIZES["clock_data"])
        struct.pack_into("<Q", buf, 0, ns)
        _native.ioctl_buf(self.fd, IOC["SET_CLOCK"], buf, "KVM_SET_CLOCK")

    # -- time --------------------------------------------------------------
    def get_tsc_khz(self) -> int:
        """The VM's default TSC frequency (KVM_CAP_VM_TSC_CONTROL hosts)."""
        return _native.ioctl_arg(self.fd, IOC["GET_TSC_KHZ"], 0, "KVM_GET_TSC_KHZ(vm)")

    def set_tsc_khz(self, khz: int) -> None:
        _native.ioctl_arg(self.fd, IOC["SET_TSC_KHZ"], khz, f"KVM_SET_TSC_KHZ(vm, {khz})")

    # -- MSR filter ----------------------------------------------------------
    def set_msr_filter(self, ranges: list[tuple[int, int, int, bytes]],
                       default_deny: bool = False) -> None:
        """KVM_X86_SET_MSR_FILTER: ranges of (flags, base, nmsrs, bitmap)."""
        if len(ranges) > 16:
            raise ConfigError("at most 16 MSR filter ranges")
        keep = [bytearray(b) for _, _, _, b in ranges]
        body = b"".join(struct.pack("<IIIxxxxQ", f, n, base, _native.buffer_address(bm))
                        for (f, base, n, _), bm in zip(ranges, keep))
        body += bytes(24 * (16 - len(ranges)))
        buf = bytearray(struct.pack("<I4x", 1 if default_deny else 0) + body)
        _native.ioctl_buf(self.fd, IOC["X86_SET_MSR_FILTER"], buf, "KVM_X86_SET_MSR_FILTER")

    # -- vCPUs ---------------------------------------------------------------
    def create_vcpu(self, vcpu_id: int) -> "Vcpu":
        from hvkit.kvm.vcpu import Vcpu
        fd = _native.ioctl_arg(self.fd, IOC["CREATE_VCPU"], vcpu_id, f"KVM_CREATE_VCPU({vcpu_id})")
        try:
            vcpu = Vcpu(self, vcpu_id, fd)
        except BaseException:
            os.close(fd)
            raise
        self.vcpus.append(vcpu)
        return vcpu

    def __iter__(self) -> Iterator["Vcpu"]:
        return iter(self.vcpus)

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
