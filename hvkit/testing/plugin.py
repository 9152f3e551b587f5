"""The hvkit pytest plugin: markers that skip where the host lacks KVM or
a capability (with a reason that says what is missing), and fixtures that
hand out KVM handles and microVMs and tear them down.

    @pytest.mark.kvm
    def test_boot(microvm):
        vm = microvm("hello")
        assert vm.run(timeout=10) == 0

    @pytest.mark.kvm_cap("TSC_CONTROL")
    def test_scaling(kvm): ...
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterator

import pytest


@functools.lru_cache(maxsize=None)
def _kvm_status(path: str = "/dev/kvm") -> tuple[bool, str]:
    try:
        from hvkit.kvm.system import kvm_usable
    except ImportError as exc:  # the native extension is not built
        return False, f"hvkit's native extension is not importable: {exc}"
    return kvm_usable(path)


@functools.lru_cache(maxsize=None)
def _cap_value(name: str) -> int:
    from hvkit.kvm.caps import Cap
    from hvkit.kvm.system import Kvm
    cap = Cap.parse(name)
    with Kvm() as kvm:
        vm = kvm.create_vm()
        try:
            return max(kvm.check_extension(cap), vm.check_extension(cap))
        finally:
            vm.close()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kvm: needs a usable /dev/kvm")
    config.addinivalue_line("markers", "kvm_cap(name): needs the named KVM capability "
                                       "(e.g. 'TSC_CONTROL')")


def require_kvm() -> None:
    ok, reason = _kvm_status()
    if not ok:
        pytest.skip(f"KVM unavailable: {reason}")


def require_cap(name: str) -> None:
    require_kvm()
    try:
        value = _cap_value(name)
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    if value <= 0:
        pytest.skip(f"this host's KVM lacks KVM_CAP_{name.upper().removeprefix('KVM_CAP_')}")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kvm") is not None:
        require_kvm()
    for mark in item.iter_markers("kvm_cap"):
        if not mark.args:
            raise pytest.UsageError(f"{item.nodeid}: kvm_cap needs a capability name")
        require_cap(str(mark.args[0]))


@pytest.fixture
def kvm() -> Iterator[Any]:
    """An open /dev/kvm (hvkit.kvm.Kvm); skips where KVM is unusable."""
    require_kvm()
    from hvkit.kvm.system import Kvm
    with Kvm() as handle:
        yield handle


@pytest.fixture
def microvm() -> Iterator[Callable[..., Any]]:
    """A factory: ``microvm("hello", memory="64M", vcpus=2)`` returns a
    MicroVM that is stopped and closed when the test ends."""
    require_kvm()
    from hvkit.machine import MicroVM
    made: list[MicroVM] = []

    def make(*args: Any, **kwargs: Any) -> MicroVM:
        vm = MicroVM(*args, **kwargs)
        made.append(vm)
        return vm

    yield make
    for vm in made:
        vm.close()
