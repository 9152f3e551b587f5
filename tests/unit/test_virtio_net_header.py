"""virtio-net writes num_buffers = 1 into every received packet's header,
wherever the guest's buffers split that header."""
from __future__ import annotations

from hypothesis import given, strategies as st

from hvkit.devices.virtio.net import HDR_SIZE, _set_num_buffers


@given(st.lists(st.integers(1, 16), min_size=1, max_size=12), st.binary(min_size=40, max_size=40))
def test_num_buffers_lands_in_header_bytes_10_and_11(sizes, original):
    buf = bytearray(original)
    views, pos = [], 0
    for n in sizes:
        if pos >= len(buf):
            break
        views.append(memoryview(buf)[pos:pos + n])
        pos += n
    if pos < HDR_SIZE:                      # the device only hands over chains that hold a header
        views.append(memoryview(buf)[pos:])
    _set_num_buffers(views)
    assert buf[10:12] == b"\x01\x00"
    assert buf[:10] == original[:10] and buf[12:] == original[12:]
