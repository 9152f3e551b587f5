"""The hvkit pytest plugin as a user's suite sees it (run through pytester)."""
import pytest

from hvkit.testing import plugin

pytest_plugins = ["pytester"]

SUITE = """
import pytest

@pytest.mark.kvm
def test_marked():
    pass

def test_fixture(kvm):
    pass

@pytest.mark.kvm_cap("IRQCHIP")
def test_cap():
    pass

def test_plain():
    pass

def test_clone(microvm_clone):
    pass
"""


def run(pytester, *args):
    # The plugin is registered by its entry point in this environment.
    return pytester.runpytest("-rs", "-p", "no:cacheprovider", *args)


def test_forced_no_kvm_skips_at_the_test_with_the_reason(pytester, monkeypatch):
    monkeypatch.setenv("HVKIT_FORCE_NO_KVM", "1")
    pytester.makepyfile(test_suite=SUITE)
    result = run(pytester)
    result.assert_outcomes(passed=1, skipped=4)
    out = result.stdout.str()
    assert "plugin.py" not in out
    # (pytest prints no line for a skip of a test that carries no marks.)
    result.stdout.fnmatch_lines([
        "SKIPPED [[]1[]] test_suite.py:3: KVM unavailable: HVKIT_FORCE_NO_KVM is set",
        "SKIPPED [[]2[]] test_suite.py: KVM unavailable: HVKIT_FORCE_NO_KVM is set",
        "SKIPPED [[]1[]] test_suite.py:10: KVM unavailable: HVKIT_FORCE_NO_KVM is set",
    ])


@pytest.mark.parametrize("value", ["0", ""])
def test_force_variable_off_means_the_real_probe(pytester, monkeypatch, value):
    monkeypatch.setenv("HVKIT_FORCE_NO_KVM", value)
    ok, _ = plugin.kvm_status()
    pytester.makepyfile(test_suite=SUITE)
    result = run(pytester)
    if ok:
        result.assert_outcomes(passed=5)
    else:
        result.assert_outcomes(passed=1, skipped=4)


@pytest.mark.parametrize("force", ["1", "0"])
def test_misspelt_capability_is_an_error_on_every_host(pytester, monkeypatch, force):
    monkeypatch.setenv("HVKIT_FORCE_NO_KVM", force)
    pytester.makepyfile(test_typo="""
        import pytest

        @pytest.mark.kvm_cap("TSC_CONTORL")
        def test_scaling():
            pass
    """)
    result = run(pytester)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_typo.py::test_scaling: unknown KVM capability "
                                 "'TSC_CONTORL'*"])


def test_capability_marker_without_a_name_is_an_error(pytester):
    pytester.makepyfile(test_noname="""
        import pytest

        @pytest.mark.kvm_cap
        def test_x():
            pass
    """)
    result = run(pytester)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*kvm_cap needs a capability name*"])


def test_require_cap_checks_the_name_first(monkeypatch):
    monkeypatch.setenv("HVKIT_FORCE_NO_KVM", "1")
    with pytest.raises(pytest.UsageError, match="unknown KVM capability 'WARP_DRIVE'"):
        plugin.require_cap("WARP_DRIVE")
    with pytest.raises(pytest.skip.Exception, match="HVKIT_FORCE_NO_KVM"):
        plugin.require_cap("irqchip")
