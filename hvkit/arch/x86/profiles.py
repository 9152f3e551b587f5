"""Host profiles: what a Linux guest needs to hear about the host it runs on.

On a nested, PVM-based KVM, guest kernel code is emulated and the emulator
lacks some instructions (``lock cmpxchg16b``, ``xrstor``, ``popcnt``,
``clac``/``stac``, ``ssse3`` paths, fast string moves); the kernel also
cannot calibrate its TSC under emulation. hvkit hides those features from
CPUID and adds the matching kernel options, and tells the kernel the TSC
rate. On a bare-metal KVM host the profile adds nothing.

Users override with ``MicroVM(host_profile="none")`` or a HostProfile.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from hvkit.errors import ConfigError
from hvkit.host import kvm_flavor

PVM_CPUID_CLEAR = ("xsave", "osxsave", "avx", "avx2", "xsaveopt", "xsavec", "xsaves",
                   "cx16", "popcnt", "smap", "ssse3", "erms", "fsrm")


@dataclass(frozen=True)
class HostProfile:
    name: str
    cmdline: tuple[str, ...] = ()
    cpuid_clear: tuple[str, ...] = field(default=())

    def apply_cmdline(self, cmdline: str) -> str:
        """Append the profile's options that the user did not set already."""
        given = {opt.split("=", 1)[0] for opt in cmdline.split()}
        extra = [opt for opt in self.cmdline if opt.split("=", 1)[0] not in given]
        return " ".join([cmdline.strip(), *extra]).strip()


NONE = HostProfile("none")


def pvm_profile(tsc_khz: int) -> HostProfile:
    from hvkit.boot.cmdline import pvm_cmdline
    return HostProfile("pvm", cmdline=tuple(pvm_cmdline(tsc_khz).split()),
                       cpuid_clear=PVM_CPUID_CLEAR)


def select_profile(choice: "str | HostProfile", tsc_khz: int) -> HostProfile:
    """``"auto"`` detects the host; ``"pvm"`` or ``"none"`` force one."""
    if isinstance(choice, HostProfile):
        return choice
    if choice == "auto":
        choice = "pvm" if kvm_flavor() == "pvm" else "none"
    if choice == "pvm":
        return pvm_profile(tsc_khz)
    if choice == "none":
        return NONE
    raise ConfigError(f"host profile {choice!r} is not one of auto, pvm, none")
