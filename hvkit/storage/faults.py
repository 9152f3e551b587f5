"""A host file that simulates power loss: torn and reordered writes.

``CrashSimFile`` behaves like ``HostFile`` while remembering every write
since the last flush together with the bytes it replaced. ``power_cut``
then rebuilds what a disk with a volatile write cache could hold after
losing power: the state at the last flush plus a random subset of the
later writes, applied in random order, one of them torn at sector
granularity. ``crash_after`` makes the n-th operation raise
``SimulatedCrash`` so a crash can land inside any step of a write path.
"""
from __future__ import annotations

import random

from hvkit.storage.hostfile import HostFile

SECTOR = 512


class SimulatedCrash(Exception):
    """Raised by ``CrashSimFile`` in place of the operation it was told to fail."""


class CrashSimFile(HostFile):
    def __init__(self, path: str, *, create: bool = False) -> None:
        super().__init__(path, create=create)
        self.pending: list[tuple[int, bytes, bytes]] = []
        self.crash_after: int | None = None
        self.ops = 0

    def _tick(self) -> None:
        self.ops += 1
        if self.crash_after is not None:
            self.crash_after -= 1
            if self.crash_after < 0:
                raise SimulatedCrash(f"simulated crash at operation {self.ops}")

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._tick()
        new = bytes(data)
        self.pending.append((offset, new, self.pread(offset, len(new))))
        super().pwrite(offset, new)

    def punch(self, offset: int, length: int) -> None:
        self._tick()
        self.pending.append((offset, bytes(length), self.pread(offset, length)))
        super().punch(offset, length)

    def flush(self) -> None:
        self._tick()
        self.stats.flushes += 1  # durability is modelled, not asked of the host
        self.pending.clear()

    def power_cut(self, rng: random.Random, *, survive: float = 0.5,
                  tear: bool = True) -> int:
        """Turn the file into a possible post-power-loss state; return how
        many unflushed writes survived (in part or whole)."""
        for offset, _new, old in reversed(self.pending):
            HostFile.pwrite(self, offset, old)
        chosen = [w for w in self.pending if rng.random() < survive]
        rng.shuffle(chosen)
        torn = rng.randrange(len(chosen)) if (tear and chosen) else -1
        for i, (offset, new, _old) in enumerate(chosen):
            if i == torn and len(new) > SECTOR:
                nsec = -(-len(new) // SECTOR)
                keep = sorted(rng.sample(range(nsec), rng.randrange(nsec)))
                for s in keep:
                    HostFile.pwrite(self, offset + s * SECTOR, new[s * SECTOR:(s + 1) * SECTOR])
            else:
                HostFile.pwrite(self, offset, new)
        self.pending.clear()
        self.crash_after = None
        return len(chosen)
