#!/usr/bin/env python3
"""Boot the bundled `hello` guest in a microVM and print what it said.

MicroVM does everything a VMM does before the first KVM_RUN (guest RAM,
vCPU in 64-bit mode, serial port, exit port, ELF loading); run() starts
the vCPU thread and returns the code the guest wrote to the exit port.
"""
from hvkit.machine import MicroVM

# "exit=7" is read by the guest (rt_arg_int) and returned from main(), so
# the exit code shows the argument string reached the guest.
with MicroVM("hello", memory="64M", args="exit=7") as vm:
    code = vm.run(timeout=10)
    print(vm.console_output.decode(), end="")
    print(f"exit code: {code}")
    # Which exits the VMM saw; "native" ones were served in C, never in Python.
    print(f"exits: {vm.exit_counts()}")
