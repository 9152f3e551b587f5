"""Guest CPUID, built from what KVM supports on this host.

KVM_GET_SUPPORTED_CPUID describes the host; each vCPU still needs its own
APIC ID in leaves 0x1, 0xB and 0x1F, or an SMP guest sees every CPU as
CPU 0.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterable

from hvkit.errors import ConfigError
from hvkit.kvm.structs import CpuidEntry

# name -> (leaf, subleaf, register, bit): the features hvkit can hide.
FEATURES: dict[str, tuple[int, int, str, int]] = {
    "fpu": (1, 0, "edx", 0),
    "tsc": (1, 0, "edx", 4),
    "msr": (1, 0, "edx", 5),
    "apic": (1, 0, "edx", 9),
    "sse3": (1, 0, "ecx", 0),
    "pclmulqdq": (1, 0, "ecx", 1),
    "monitor": (1, 0, "ecx", 3),
    "vmx": (1, 0, "ecx", 5),
    "ssse3": (1, 0, "ecx", 9),
    "fma": (1, 0, "ecx", 12),
    "cx16": (1, 0, "ecx", 13),
    "pcid": (1, 0, "ecx", 17),
    "sse4_1": (1, 0, "ecx", 19),
    "sse4_2": (1, 0, "ecx", 20),
    "x2apic": (1, 0, "ecx", 21),
    "movbe": (1, 0, "ecx", 22),
    "popcnt": (1, 0, "ecx", 23),
    "tsc_deadline": (1, 0, "ecx", 24),
    "aes": (1, 0, "ecx", 25),
    "xsave": (1, 0, "ecx", 26),
    "osxsave": (1, 0, "ecx", 27),
    "avx": (1, 0, "ecx", 28),
    "f16c": (1, 0, "ecx", 29),
    "rdrand": (1, 0, "ecx", 30),
    "hypervisor": (1, 0, "ecx", 31),
    "fsgsbase": (7, 0, "ebx", 0),
    "bmi1": (7, 0, "ebx", 3),
    "avx2": (7, 0, "ebx", 5),
    "smep": (7, 0, "ebx", 7),
    "bmi2": (7, 0, "ebx", 8),
    "erms": (7, 0, "ebx", 9),
    "invpcid": (7, 0, "ebx", 10),
    "avx512f": (7, 0, "ebx", 16),
    "rdseed": (7, 0, "ebx", 18),
    "adx": (7, 0, "ebx", 19),
    "smap": (7, 0, "ebx", 20),
    "clflushopt": (7, 0, "ebx", 23),
    "sha_ni": (7, 0, "ebx", 29),
    "umip": (7, 0, "ecx", 2),
    "pku": (7, 0, "ecx", 3),
    "la57": (7, 0, "ecx", 16),
    "rdpid": (7, 0, "ecx", 22),
    "fsrm": (7, 0, "edx", 4),
    "md_clear": (7, 0, "edx", 10),
    "xsaveopt": (0xD, 1, "eax", 0),
    "xsavec": (0xD, 1, "eax", 1),
    "xsaves": (0xD, 1, "eax", 3),
    "lahf_lm": (0x80000001, 0, "ecx", 0),
    "abm": (0x80000001, 0, "ecx", 5),
    "syscall": (0x80000001, 0, "edx", 11),
    "nx": (0x80000001, 0, "edx", 20),
    "pdpe1gb": (0x80000001, 0, "edx", 26),
    "rdtscp": (0x80000001, 0, "edx", 27),
    "lm": (0x80000001, 0, "edx", 29),
    "invtsc": (0x80000007, 0, "edx", 8),
}


def find(entries: Iterable[CpuidEntry], leaf: int, subleaf: int = 0) -> CpuidEntry | None:
    for e in entries:
        if e.function == leaf and (e.index == subleaf or not e.flags & CpuidEntry.SIGNIFICANT_INDEX):
            return e
    return None


def has_feature(entries: Iterable[CpuidEntry], name: str) -> bool:
    leaf, sub, reg, bit = _feature(name)
    e = find(entries, leaf, sub)
    return bool(e and getattr(e, reg) >> bit & 1)


def _feature(name: str) -> tuple[int, int, str, int]:
    try:
        return FEATURES[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown CPUID feature {name!r}; known: "
                          f"{', '.join(sorted(FEATURES))}") from None


def build_cpuid(supported: Iterable[CpuidEntry], vcpu_id: int, nr_vcpus: int, *,
                clear: Iterable[str] = (), apic_id: int | None = None) -> list[CpuidEntry]:
    """The CPUID table for one vCPU: KVM's supported set with this vCPU's
    APIC ID, the hypervisor bit, and ``clear`` features removed."""
    if nr_vcpus < 1 or not 0 <= vcpu_id < nr_vcpus:
        raise ConfigError(f"vCPU {vcpu_id} of {nr_vcpus} is not a valid vCPU")
    aid = vcpu_id if apic_id is None else apic_id
    out = []
    for e in supported:
        e = replace(e)
        if e.function == 1:
            # EBX[31:24] initial APIC ID, [23:16] logical processors per package.
            e.ebx = (e.ebx & 0x0000FFFF) | ((nr_vcpus & 0xFF) << 16) | ((aid & 0xFF) << 24)
            e.ecx |= 1 << 31  # running under a hypervisor
            if nr_vcpus > 1:
                e.edx |= 1 << 28  # HTT: the EBX count is valid
        elif e.function in (0xB, 0x1F):
            # x2APIC topology: one thread per core, nr_vcpus cores per package.
            e.edx = aid
            if e.index == 0:
                e.eax, e.ebx, e.ecx = 0, 1, (1 << 8) | 0
            elif e.index == 1:
                shift = max(nr_vcpus - 1, 0).bit_length()
                e.eax, e.ebx, e.ecx = shift, nr_vcpus, (2 << 8) | 1
            else:
                e.eax, e.ebx, e.ecx = 0, 0, e.index
        elif e.function == 4:
            # Cores per package in EAX[31:26] (minus one).
            e.eax = (e.eax & 0x03FFFFFF) | (((nr_vcpus - 1) & 0x3F) << 26)
        out.append(e)
    for name in clear:
        leaf, sub, reg, bit = _feature(name)
        e = find(out, leaf, sub)
        if e is not None:
            setattr(e, reg, getattr(e, reg) & ~(1 << bit))
    return out


def set_leaf(entries: list[CpuidEntry], leaf: int, subleaf: int = 0, *,
             eax: int | None = None, ebx: int | None = None, ecx: int | None = None,
             edx: int | None = None, significant_index: bool | None = None) -> CpuidEntry:
    """Set registers of one leaf (adding the leaf if it is missing), for a
    VMM that presents a guest with CPUID values of its own."""
    for name, value in (("eax", eax), ("ebx", ebx), ("ecx", ecx), ("edx", edx)):
        if value is not None and not 0 <= value <= 0xFFFFFFFF:
            raise ConfigError(f"CPUID {leaf:#x}.{subleaf}: {name}={value:#x} is not 32 bits")
    e = next((x for x in entries if x.function == leaf and x.index == subleaf), None)
    if e is None:
        e = CpuidEntry(leaf, subleaf)
        entries.append(e)
    if significant_index is not None:
        e.flags = (e.flags | CpuidEntry.SIGNIFICANT_INDEX) if significant_index \
            else (e.flags & ~CpuidEntry.SIGNIFICANT_INDEX)
    for name, value in (("eax", eax), ("ebx", ebx), ("ecx", ecx), ("edx", edx)):
        if value is not None:
            setattr(e, name, value)
    return e


def set_feature(entries: list[CpuidEntry], name: str, on: bool) -> None:
    """Show or hide one named feature bit (see FEATURES)."""
    leaf, sub, reg, bit = _feature(name)
    e = find(entries, leaf, sub) or set_leaf(entries, leaf, sub)
    value = getattr(e, reg)
    setattr(e, reg, value | (1 << bit) if on else value & ~(1 << bit))


def vendor(entries: Iterable[CpuidEntry]) -> str:
    """The 12-character vendor string of leaf 0 ("GenuineIntel", "AuthenticAMD")."""
    e = find(entries, 0)
    if e is None:
        return ""
    return b"".join(r.to_bytes(4, "little") for r in (e.ebx, e.edx, e.ecx)).decode(
        "ascii", errors="replace")


def set_vendor(entries: list[CpuidEntry], name: str) -> None:
    """Present another vendor string in leaf 0 (and its 0x80000000 mirror
    on AMD-style tables); exactly 12 ASCII characters."""
    raw = name.encode("ascii", errors="replace")
    if len(raw) != 12:
        raise ConfigError(f"CPUID vendor {name!r} is not 12 ASCII characters")
    ebx, edx, ecx = (int.from_bytes(raw[i:i + 4], "little") for i in (0, 4, 8))
    set_leaf(entries, 0, ebx=ebx, edx=edx, ecx=ecx)
    ext = find(entries, 0x80000000)
    if ext is not None and (ext.ebx or ext.ecx or ext.edx):
        ext.ebx, ext.edx, ext.ecx = ebx, edx, ecx
