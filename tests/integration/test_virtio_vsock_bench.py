"""The freestanding vsock driver's benchmark mode (guests/virtio_vsock.c
bench=1) on /dev/kvm: round trips, then a stream each way with credit flow
control in both directions, every byte checked by the receiving side."""
from __future__ import annotations

import socket
import threading

import pytest

pytestmark = pytest.mark.kvm

HC_RESULT, HC_START = 0x1420, 0x1421


def stream(offset: int, n: int) -> bytes:
    return bytes((offset + i) % 251 for i in range(n))


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = sock.recv(n - len(data))
        assert part, f"connection closed after {len(data)} of {n} bytes"
        data += part
    return data


@pytest.mark.parametrize("transport", ["pci", "mmio"])
def test_vsock_bench_mode_moves_checked_streams_both_ways(microvm, tmp_path, transport):
    """600 KiB each way, more than either side's credit (256 and 128 KiB),
    so both sides must wait for and send credit updates."""
    rounds, msg, total = 20, 100, 600 * 1024
    uds = str(tmp_path / "v.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(uds + "_1234")
    srv.listen(1)
    srv.settimeout(60)
    errors: list[BaseException] = []
    got = bytearray()

    def peer() -> None:
        try:
            conn, _ = srv.accept()
            conn.settimeout(60)
            with conn:
                for i in range(rounds):
                    m = recv_exact(conn, msg)
                    assert m == bytes((i + k) & 0xFF for k in range(msg)), i
                    conn.sendall(m)
                while len(got) < total:
                    got.extend(conn.recv(65536))
                conn.sendall(b"K")
                assert recv_exact(conn, 1) == b"G"
                conn.sendall(stream(0, total))
                while conn.recv(4096):
                    pass
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=peer, daemon=True)
    t.start()
    results = []
    vm = microvm("virtio_vsock", memory="64M",
                 args=f"mmio={int(transport == 'mmio')} port=1234 bench=1 rounds={rounds} "
                      f"msg={msg} bytes={total} chunk=3000")
    vm.hypercalls.register(HC_START, lambda call: 0, "vsock-bench-start")
    vm.hypercalls.register(HC_RESULT, lambda call: results.append(call.args) or 0,
                           "vsock-bench-result")
    vm.add_virtio_vsock(3, uds, transport=transport)
    assert vm.run(timeout=300) == 0, vm.console_output.decode()
    t.join(30)
    srv.close()
    assert not errors, errors
    assert bytes(got) == stream(0, total)
    rounds_msg, nbytes, c_rt, c_out, c_in = results[0][:5]
    assert rounds_msg == rounds | msg << 32 and nbytes == total
    assert min(c_rt, c_out, c_in) > 0
