"""Exceptions shared by every part of hvkit.

They live in one module so that users can catch one family
(``HvkitError``) whatever part of the toolkit raised it.
"""
from __future__ import annotations

import errno as _errno
import os
from typing import Any, Mapping


class HvkitError(Exception):
    """Base of every error hvkit raises on purpose."""


class ConfigError(HvkitError, ValueError):
    """A configuration that cannot work, refused before any VM exists."""


class GuestMemoryError(HvkitError, ValueError):
    """A guest-physical access outside guest RAM (or otherwise invalid)."""

    def __init__(self, message: str, gpa: int = 0, size: int = 0) -> None:
        super().__init__(message)
        self.gpa = gpa
        self.size = size


class GuestLoadError(HvkitError, ValueError):
    """A guest image (ELF, bzImage, ...) that hvkit cannot load."""


class KvmError(HvkitError, OSError):
    """A KVM ioctl failed; names the call and the errno."""

    def __init__(self, call: str, err: int, detail: str = "") -> None:
        name = _errno.errorcode.get(err, str(err))
        msg = f"{call} failed: {name} ({os.strerror(err)})"
        if detail:
            msg += f": {detail}"
        OSError.__init__(self, err, msg)
        self.call = call
        self.errno = err
        self.strerror = msg

    def __str__(self) -> str:
        return self.strerror


class GuestCrash(HvkitError):
    """The guest died: triple fault, failed entry, internal error or an
    exception reported by the guest runtime. Carries the exit reason and
    the register state at the time."""

    def __init__(self, reason: str, message: str = "",
                 regs: Any = None, sregs: Any = None,
                 data: Mapping[str, Any] | None = None, vcpu: int = 0) -> None:
        self.reason = reason
        self.detail = message
        self.regs = regs
        self.sregs = sregs
        self.data = dict(data or {})
        self.vcpu = vcpu
        text = f"guest crash on vCPU {vcpu}: {reason}"
        if message:
            text += f": {message}"
        if regs is not None:
            text += f"\n  rip={regs.rip:#x} rsp={regs.rsp:#x} rflags={regs.rflags:#x}"
        if sregs is not None:
            text += (f"\n  cr0={sregs.cr0:#x} cr3={sregs.cr3:#x} cr4={sregs.cr4:#x}"
                     f" efer={sregs.efer:#x} cs.sel={sregs.cs.selector:#x}")
        super().__init__(text)

    def with_registers(self, regs: Any, sregs: Any) -> "GuestCrash":
        """The same crash with the vCPU's registers, for a crash reported
        by the guest itself (a hypercall), where none were read yet."""
        return GuestCrash(self.reason, self.detail, regs, sregs, self.data, self.vcpu)


class GuestTimeout(HvkitError, TimeoutError):
    """The guest did not finish within the time the caller allowed."""
