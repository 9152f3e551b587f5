"""Linux kernel command lines: building them and writing them into the guest.

The defaults differ by host: on a nested, PVM-based KVM every CPL0
instruction is emulated and the emulator lacks some (xrstor, popcnt,
cmpxchg16b, clac/stac, int3, fwait), so the kernel must be told not to use
them; on bare-metal KVM none of that is wanted.
"""
from __future__ import annotations

import shlex
from typing import TYPE_CHECKING, Iterable, Mapping

from hvkit.errors import GuestLoadError

if TYPE_CHECKING:
    from hvkit.memory.guest import GuestMemory

# Every Linux guest of an hvkit microVM: the 16550 console, reboot through
# the i8042 reset line (the VMM stops the VM on it), reboot at once on panic.
BASE_CMDLINE = "console=ttyS0 reboot=k panic=-1"

# CPU features the PVM emulator cannot run at CPL0, by the instruction that
# would trap: cx16 (lock cmpxchg16b), popcnt, smap (clac/stac), ssse3 and
# erms/fsrm (string and SIMD paths the emulator gets wrong or lacks).
PVM_CLEARCPUID = ("cx16", "popcnt", "smap", "ssse3", "erms", "fsrm")


# Guest user code runs natively under PVM with the host's XCR0 (AVX and
# AVX-512 on), but a "noxsave" kernel switches only x87/SSE state, so YMM/ZMM
# and mask registers leak between processes (measured: 2 of 3 sched_yield
# round trips with another AVX user came back corrupted). The kernel cannot
# hide AVX (PVM ignores the guest's XCR0 for user mode), so keep glibc's
# string functions off AVX; Linux hands this unknown NAME=value parameter to
# init as an environment variable, and every process inherits it.
PVM_GLIBC_TUNABLES = ("GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,"
                      "-AVX512BW,-AVX512DQ,-AVX512CD,-AVX_Fast_Unaligned_Load,-FMA,-FMA4")


def pvm_cmdline(tsc_khz: int) -> str:
    """Options a kernel needs to boot on a nested PVM-based KVM.

    ``tsc_khz`` is the host TSC frequency (the guest sees the raw host TSC):
    giving it skips the TSC calibration, which is slow when emulated and
    inaccurate. ``pvm_quirks`` is understood by hvkit's microVM kernel
    (guests/linux) only; other kernels print it as unknown and go on.
    ``GLIBC_TUNABLES`` keeps glibc programs off AVX (see
    ``PVM_GLIBC_TUNABLES``); code that uses AVX itself is not protected.
    """
    if tsc_khz <= 0:
        raise ValueError(f"tsc_khz must be positive, got {tsc_khz}")
    return " ".join([
        "noxsave",
        "clearcpuid=" + ",".join(PVM_CLEARCPUID),
        f"tsc_early_khz={tsc_khz}",
        "tsc=reliable",
        "cryptomgr.notests",
        "init_on_alloc=0",
        "pvm_quirks",
        PVM_GLIBC_TUNABLES,
    ])


def join_cmdline(*parts: str | Iterable[str] | Mapping[str, object] | None) -> str:
    """Join command-line fragments, dropping empty ones.

    A mapping becomes ``key=value`` words (``key`` alone for ``True``, left
    out for ``None`` or ``False``); later fragments win on the kernel side
    because Linux keeps the last value of a repeated parameter.
    """
    words: list[str] = []
    for part in parts:
        if part is None:
            continue
        if isinstance(part, str):
            words.extend(part.split())
        elif isinstance(part, Mapping):
            for key, value in part.items():
                if value is None or value is False:
                    continue
                words.append(key if value is True else f"{key}={_quote(str(value))}")
        else:
            for word in part:
                words.extend(str(word).split())
    return " ".join(words)


def _quote(value: str) -> str:
    # Linux's parser accepts double quotes around a value with spaces.
    if any(c.isspace() for c in value):
        if '"' in value:
            raise GuestLoadError(f"command-line value {value!r} has both spaces and a quote")
        return f'"{value}"'
    return value


def split_cmdline(cmdline: str) -> list[str]:
    """The words of a command line, honouring double quotes as Linux does."""
    return shlex.split(cmdline, posix=True)


def encode_cmdline(cmdline: str, max_len: int) -> bytes:
    """The NUL-terminated bytes of ``cmdline``; ``max_len`` counts the NUL.

    Raises GuestLoadError when the kernel would truncate it, because a
    silently cut command line (say, a lost ``init=``) is hard to debug.
    """
    try:
        raw = cmdline.encode("ascii")
    except UnicodeEncodeError:
        raise GuestLoadError(
            f"kernel command line has non-ASCII characters: {cmdline!r}") from None
    if b"\0" in raw:
        raise GuestLoadError("kernel command line contains a NUL byte")
    if len(raw) + 1 > max_len:
        raise GuestLoadError(
            f"kernel command line is {len(raw)} bytes; this kernel accepts at most "
            f"{max_len - 1}")
    return raw + b"\0"


def write_cmdline(memory: "GuestMemory", gpa: int, cmdline: str, max_len: int) -> int:
    """Write ``cmdline`` NUL-terminated at ``gpa``; returns the bytes written."""
    raw = encode_cmdline(cmdline, max_len)
    memory.write(gpa, raw)
    return len(raw)


def host_tsc_khz(cpuinfo: str = "/proc/cpuinfo") -> int:
    """The host TSC frequency in kHz as this host's kernel measured it
    ("cpu MHz" in /proc/cpuinfo; 2596096 on the PVM machines). A guest on a
    PVM-based KVM sees this raw TSC, so it is what tsc_early_khz should say."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(round(float(line.split(":", 1)[1]) * 1000))
    except (OSError, ValueError):
        pass
    raise GuestLoadError(f"cannot read the TSC frequency from {cpuinfo} ('cpu MHz')")


def recommended_cmdline(extra: str = "", *, flavor: str | None = None,
                        tsc_khz: int | None = None) -> str:
    """The command line hvkit boots Linux guests with on this host: the base
    options, the PVM options when KVM here is PVM-based, then ``extra``."""
    if flavor is None:
        from hvkit.host import kvm_flavor
        flavor = kvm_flavor()
    parts = [BASE_CMDLINE]
    if flavor == "pvm":
        parts.append(pvm_cmdline(tsc_khz or host_tsc_khz()))
    parts.append(extra)
    return join_cmdline(*parts)
