"""The suite's own hooks (tests/conftest.py): the ``gpu`` marker's skip and the device-count guard."""

from __future__ import annotations

import pathlib

import jax
import pytest
from conftest import GPU_SKIP_REASON, require_devices

CONFTEST = pathlib.Path(__file__).with_name("conftest.py")


def test_gpu_marker_skips_with_a_reason_on_cpu(pytester):
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs an accelerator\naddopts = --strict-markers\n")
    pytester.makepyfile(test_probe="""
        import pytest

        @pytest.mark.gpu
        def test_needs_accelerator():
            pass

        def test_plain():
            pass
    """)
    result = pytester.runpytest("-rs", "-p", "no:cacheprovider")
    if jax.default_backend() == "cpu":
        result.assert_outcomes(passed=1, skipped=1)
        result.stdout.fnmatch_lines([f"SKIPPED*{GPU_SKIP_REASON}*"])
    else:
        result.assert_outcomes(passed=2)


@pytest.mark.parametrize("required", ["0", "1"])
def test_too_few_devices_skip_or_fail_under_require_shared(monkeypatch, required):
    monkeypatch.setenv("JAXPREF_REQUIRE_SHARED", required)
    require_devices(8, 8)  # enough: no-op
    expected = pytest.fail.Exception if required == "1" else pytest.skip.Exception
    with pytest.raises(expected, match="needs 8 .*devices, 1 visible"):
        require_devices(1, 8)
