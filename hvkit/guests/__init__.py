"""The freestanding guests that ship with hvkit (built from guests/ by setup.py)."""
from __future__ import annotations

import os

from hvkit.errors import GuestLoadError

HERE = os.path.dirname(os.path.abspath(__file__))


def available() -> list[str]:
    return sorted(f[:-4] for f in os.listdir(HERE) if f.endswith(".elf"))


def path(name: str) -> str:
    """Path of a bundled guest by name (``"hello"``), or ``name`` itself if
    it is a file."""
    if os.path.sep in name or name.endswith(".elf") or os.path.exists(name):
        try:
            os.stat(name)
        except FileNotFoundError:
            raise GuestLoadError(f"{name}: no such guest image") from None
        except OSError as exc:
            raise GuestLoadError(f"{name}: cannot read guest image: "
                                 f"{(exc.strerror or str(exc)).lower()}") from None
        return name
    p = os.path.join(HERE, f"{name}.elf")
    if not os.path.exists(p):
        have = ", ".join(available()) or "none (reinstall hvkit to build them)"
        raise GuestLoadError(f"no bundled guest named {name!r}; bundled guests: {have}")
    return p
