#!/usr/bin/env python3
"""Talk to a guest over its serial console: the `echo` guest writes back
every byte it receives and exits on ^D with the count it echoed.

The guest runs on its own thread after start(), so this thread is free to
wait for its prompt and type into the emulated 16550 with send_input()
(the UART raises IRQ 4 through the in-kernel irqchip when input arrives).
"""
import time

from hvkit.machine import MicroVM

MESSAGE = b"hello over the serial line\n"

with MicroVM("echo", memory="64M") as vm:
    vm.start()
    # Wait for the prompt so no input arrives before the guest listens.
    deadline = time.monotonic() + 10
    while b"echo ready" not in vm.console_output:
        if time.monotonic() > deadline:
            raise SystemExit("guest never printed its prompt")
        time.sleep(0.01)
    vm.send_input(MESSAGE)
    vm.send_input(b"\x04")          # ^D: the guest stops echoing and exits
    code = vm.wait(timeout=10)
    print(vm.console_output.decode(), end="")
    print(f"guest echoed {code} bytes (sent {len(MESSAGE)})")
