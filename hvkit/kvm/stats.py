"""KVM's binary statistics (KVM_GET_STATS_FD): counters the kernel keeps per
VM and per vCPU, including exits it handles itself (ioeventfd, in-kernel
APIC) that never reach user space."""
from __future__ import annotations

import os
import struct

from hvkit import _native

HEADER = struct.Struct("<6I")
DESC = struct.Struct("<IhHII")


class Stats:
    """An open stats fd; ``read()`` returns {name: value} (lists for
    histograms)."""

    def __init__(self, owner_fd: int) -> None:
        self.fd = _native.ioctl_arg(owner_fd, _native.IOCTLS["GET_STATS_FD"], 0, "KVM_GET_STATS_FD")
        _flags, name_size, ndesc, _id_off, desc_off, self.data_off = HEADER.unpack(
            os.pread(self.fd, HEADER.size, 0))
        stride = DESC.size + name_size
        raw = os.pread(self.fd, stride * ndesc, desc_off)
        self.fields: list[tuple[str, int, int]] = []
        for i in range(ndesc):
            _f, _exp, size, offset, _bucket = DESC.unpack_from(raw, i * stride)
            name = raw[i * stride + DESC.size:(i + 1) * stride].split(b"\0", 1)[0].decode()
            self.fields.append((name, offset, size))
        self.data_size = max((o + 8 * s for _, o, s in self.fields), default=0)

    def read(self) -> dict[str, int | list[int]]:
        data = os.pread(self.fd, self.data_size, self.data_off)
        out: dict[str, int | list[int]] = {}
        for name, offset, size in self.fields:
            values = struct.unpack_from(f"<{size}Q", data, offset)
            out[name] = values[0] if size == 1 else list(values)
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
