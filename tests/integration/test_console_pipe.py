"""A console nobody reads never stops the guest: output to a full pipe is
dropped (and counted) once the pipe stays full, and the in-memory console
keeps every byte."""
from __future__ import annotations

import os

import pytest


def full_pipe() -> tuple[int, int]:
    rfd, wfd = os.pipe()
    os.set_blocking(wfd, False)
    try:
        while True:
            os.write(wfd, b"\0" * 4096)
    except BlockingIOError:
        pass
    os.set_blocking(wfd, True)     # as a terminal or a shell pipe would be
    return rfd, wfd


@pytest.mark.kvm
@pytest.mark.parametrize("native", [True, False], ids=["c-path", "python-path"])
def test_guest_finishes_with_its_console_pipe_full(microvm, native):
    rfd, wfd = full_pipe()
    try:
        vm = microvm("hello", memory="64M", args="exit=3", console=wfd,
                     native_devices=native)
        assert vm.run(timeout=30) == 3
        assert b"Hello from an hvkit guest!" in vm.console_output
        assert vm.serial.tx_dropped > 0
        assert vm.console.fd_dropped == vm.serial.tx_dropped
    finally:
        os.close(rfd)
        os.close(wfd)
