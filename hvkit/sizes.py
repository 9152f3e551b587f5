"""Parse human sizes such as ``64M`` or ``1G`` (binary units): the one
size grammar of every hvkit command and constructor."""
from __future__ import annotations

import re

from hvkit.errors import ConfigError

_UNITS = {"B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"\s*(\d+)\s*([BKMGTP]?)(?:i?B)?\s*", re.IGNORECASE)

#: the largest size any hvkit object can hold (a 64-bit byte count)
MAX_SIZE = (1 << 63) - 1


def parse_size(value: int | str, what: str = "size", *, bare: str | None = "B",
               multiple: int = 1, allow_zero: bool = False) -> int:
    """Bytes from an int (bytes) or a string ``<n>[B|K|M|G|T|P][iB]``.

    ``bare`` is the unit of a number without one ("B" for disk sizes as in
    qemu-img, "M" for guest memory as in QEMU's ``-m``; None refuses it with
    "add a unit"). ``multiple`` refuses sizes that are not a multiple of it
    (sector sizes, pages)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"{what} must be a size like 64M or a number of bytes, "
                          f"not {type(value).__name__}")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE.fullmatch(value)
        if not m:
            raise ConfigError(f"{what} {value!r} is not a size like 64M, 512K or 1G")
        unit = m.group(2).upper()
        if not unit:
            if bare is None:
                raise ConfigError(f"{what} {value!r} has no unit: add one (K, M, G)")
            unit = bare
        n = int(m.group(1)) * _UNITS[unit]
    if n < 0 or (n == 0 and not allow_zero):
        raise ConfigError(f"{what} must be positive, got {value!r}")
    if n > MAX_SIZE:
        raise ConfigError(f"{what} {value!r} is too large (more than 8 EiB)")
    if multiple > 1 and n % multiple:
        raise ConfigError(f"{what} {value!r} is not a multiple of {multiple} bytes")
    return n


def format_size(n: int) -> str:
    """The shortest exact binary-unit spelling: 67108864 -> '64M'."""
    for unit in "PTGMK":
        if n and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)
