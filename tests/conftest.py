"""Shared test setup.

Eight fake CPU devices are configured before JAX initialises so mesh tests can run anywhere; the
``eight_devices`` fixture skips with a reason when fewer are visible, except under
``JAXPREF_REQUIRE_SHARED=1`` (CI), where that is an error. Real data lives in ``../shared/data``
(never committed here); tests that need it use the ``shared_data`` fixture, which skips the same way.
Tests marked ``gpu`` are skipped with a reason unless JAX's default backend is an accelerator.
"""

from __future__ import annotations

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

pytest_plugins = ["pytester"]  # tests/test_conftest.py runs the hooks below on tiny generated suites

GPU_SKIP_REASON = "needs a GPU/TPU; jax.devices() is cpu"

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("JAXPREF_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def _require_shared() -> bool:
    return os.environ.get("JAXPREF_REQUIRE_SHARED", "0") == "1"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """Path to ``../shared/data``; skips (or fails under JAXPREF_REQUIRE_SHARED=1) if absent."""
    if not SHARED_DATA.is_dir():
        msg = f"shared data directory not found at {SHARED_DATA} (set JAXPREF_SHARED_DATA)"
        if _require_shared():
            pytest.fail(msg + "; JAXPREF_REQUIRE_SHARED=1 makes this an error")
        pytest.skip(msg)
    return SHARED_DATA


def require_devices(have: int, need: int) -> None:
    """Skips (fails under JAXPREF_REQUIRE_SHARED=1) when ``have`` < ``need`` JAX devices are visible."""
    if have >= need:
        return
    msg = (f"needs {need} (fake) devices, {have} visible: "
           f"XLA_FLAGS=--xla_force_host_platform_device_count={need}")
    if _require_shared():
        pytest.fail(msg + "; JAXPREF_REQUIRE_SHARED=1 makes this an error")
    pytest.skip(msg)


@pytest.fixture
def eight_devices() -> list:
    """The 8 devices mesh tests shard over (see :func:`require_devices`)."""
    import jax

    require_devices(len(jax.devices()), 8)
    return jax.devices()[:8]


def pytest_collection_modifyitems(config, items):
    """Skips ``gpu``-marked tests, with a reason, unless JAX's default backend is an accelerator."""
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu:
        return  # no JAX import (or backend start) for suites without gpu tests
    import jax

    if jax.default_backend() == "cpu":
        for item in gpu:
            item.add_marker(pytest.mark.skip(reason=GPU_SKIP_REASON))


@pytest.fixture(autouse=True, scope="session")
def _hf_home(tmp_path_factory):
    """Keep HF / datasets caches inside a temporary directory."""
    home = tmp_path_factory.mktemp("hf_home")
    os.environ.setdefault("HF_HOME", str(home))
    os.environ.setdefault("HF_DATASETS_CACHE", str(home / "datasets"))
    yield


@pytest.fixture(scope="session")
def subprocess_env(tmp_path_factory) -> dict[str, str]:
    """Environment for training subprocesses: one CPU device (cheaper compiles than eight) and a
    persistent compilation cache shared by the session, so identical tiny runs compile only once."""
    cache = tmp_path_factory.mktemp("jax_compilation_cache")
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
            "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
