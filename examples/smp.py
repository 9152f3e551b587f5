#!/usr/bin/env python3
"""Two vCPUs: each runs the `smp` guest's main() on its own host thread.

Every vCPU prints its index and APIC IDs; vCPU 0 waits until all have
reported and exits with their count, so an exit code of 2 means both
vCPUs really ran (not one after the other on a single vCPU).
"""
from hvkit.machine import MicroVM

VCPUS = 2

with MicroVM("smp", memory="64M", vcpus=VCPUS) as vm:
    code = vm.run(timeout=20)
    print(vm.console_output.decode(), end="")
    print(f"{code} of {VCPUS} vCPUs reported")
    # One host thread per vCPU; each has its own run loop and exit counts.
    for vcpu in vm.vcpus:
        print(f"vcpu{vcpu.id}: {vcpu.runner.kvm_runs} KVM_RUNs, "
              f"{vcpu.runner.native_exits} exits served natively")
