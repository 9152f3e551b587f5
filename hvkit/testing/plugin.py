"""The hvkit pytest plugin: markers that skip where the host lacks KVM or
a capability (with a reason that says what is missing), and fixtures that
hand out KVM handles and microVMs and tear them down.

    @pytest.mark.kvm
    def test_boot(microvm):
        vm = microvm("hello")
        assert vm.run(timeout=10) == 0

    @pytest.mark.kvm_cap("TSC_CONTROL")
    def test_scaling(kvm): ...

Skips are decided when the tests are collected, so each is reported at the
test that was skipped. A capability name that hvkit does not know is a
usage error on every host (a typo must not pass as "this host lacks it").
Set ``HVKIT_FORCE_NO_KVM=1`` to take the "no KVM" path on a host that has
KVM, to check how a suite behaves where KVM is missing.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Iterator

import pytest

from hvkit.testing.snapshots import microvm_clone, vm_snapshots  # noqa: F401 (fixtures)

FORCE_NO_KVM = "HVKIT_FORCE_NO_KVM"
# Fixtures of this plugin that need KVM: a test using one is skipped like a
# test marked ``kvm``.
KVM_FIXTURES = ("kvm", "microvm", "microvm_clone", "vm_snapshots")


def _forced_off() -> bool:
    return os.environ.get(FORCE_NO_KVM, "").strip().lower() not in ("", "0", "no", "false")


@functools.lru_cache(maxsize=None)
def _probe(path: str) -> tuple[bool, str]:
    try:
        from hvkit.kvm.system import kvm_usable
    except ImportError as exc:  # the native extension is not built
        return False, f"hvkit's native extension is not importable: {exc}"
    return kvm_usable(path)


def kvm_status(path: str = "/dev/kvm") -> tuple[bool, str]:
    """(True, "") where hvkit can make VMs here, else (False, the reason)."""
    if _forced_off():
        return False, f"{FORCE_NO_KVM} is set"
    return _probe(path)


_kvm_status = kvm_status   # the name earlier versions used


def cap_name(name: Any) -> str:
    """The canonical name of a capability (``"tsc_control"`` ->
    ``"TSC_CONTROL"``); raises pytest.UsageError for a name hvkit does not
    know, whatever the host."""
    from hvkit.kvm.caps import Cap
    try:
        return Cap.parse(name).name
    except (ValueError, TypeError):
        raise pytest.UsageError(f"unknown KVM capability {name!r} (names are those of "
                                f"hvkit.kvm.caps.Cap, e.g. 'TSC_CONTROL')") from None


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


def _skip_reason(needs_kvm: bool, caps: list[str]) -> str | None:
    if not (needs_kvm or caps):
        return None
    ok, reason = kvm_status()
    if not ok:
        return f"KVM unavailable: {reason}"
    for name in caps:
        if _cap_value(name) <= 0:
            return f"this host's KVM lacks KVM_CAP_{name}"
    return None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kvm: needs a usable /dev/kvm")
    config.addinivalue_line("markers", "kvm_cap(name): needs the named KVM capability "
                                       "(e.g. 'TSC_CONTROL')")


def _caps_of(item: pytest.Item) -> list[str]:
    caps = []
    for mark in item.iter_markers("kvm_cap"):
        if not mark.args:
            raise pytest.UsageError(f"{item.nodeid}: kvm_cap needs a capability name")
        try:
            caps.append(cap_name(mark.args[0]))
        except pytest.UsageError as exc:
            raise pytest.UsageError(f"{item.nodeid}: {exc}") from None
    return caps


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Check every kvm_cap name, then mark the tests this host cannot run
    as skipped (reported at the test, with the reason)."""
    errors, plans = [], []
    for item in items:
        try:
            caps = _caps_of(item)
        except pytest.UsageError as exc:
            errors.append(str(exc))
            continue
        needs_kvm = (item.get_closest_marker("kvm") is not None
                     or any(f in KVM_FIXTURES for f in getattr(item, "fixturenames", ())))
        plans.append((item, needs_kvm, caps))
    if errors:
        raise pytest.UsageError("\n".join(errors))
    for item, needs_kvm, caps in plans:
        reason = _skip_reason(needs_kvm, caps)
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


def require_kvm() -> None:
    """Skip the calling test unless KVM is usable (for tests that decide at
    run time; markers are reported better)."""
    ok, reason = kvm_status()
    if not ok:
        pytest.skip(f"KVM unavailable: {reason}")


def require_cap(name: str) -> None:
    """Skip the calling test unless the host's KVM has capability ``name``;
    an unknown name is a usage error."""
    canonical = cap_name(name)
    require_kvm()
    if _cap_value(canonical) <= 0:
        pytest.skip(f"this host's KVM lacks KVM_CAP_{canonical}")


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
