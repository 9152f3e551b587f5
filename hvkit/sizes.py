"""Parse human sizes such as ``64M`` or ``1G`` (binary units)."""
from __future__ import annotations

import re

from hvkit.errors import ConfigError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: int | str, what: str = "size") -> int:
    if isinstance(value, int):
        if value <= 0:
            raise ConfigError(f"{what} must be positive, got {value}")
        return value
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", str(value), re.IGNORECASE)
    if not m:
        raise ConfigError(f"{what} {value!r} is not a size like 64M, 512K or 1G")
    n = int(m.group(1)) * _UNITS[m.group(2).upper()]
    if n <= 0:
        raise ConfigError(f"{what} must be positive, got {value!r}")
    return n
