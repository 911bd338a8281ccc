"""Shared test setup.

Eight fake CPU devices are configured before JAX initialises so mesh tests can run anywhere; the
``eight_devices`` fixture skips with a reason when fewer are visible, except under
``JAXPREF_REQUIRE_SHARED=1`` (CI), where that is an error. Real data lives in ``../shared/data``
(never committed here); tests that need it use the ``shared_data`` fixture, which skips the same way.
Tests marked ``gpu`` are skipped with a reason unless JAX's default backend is an accelerator.

Compile settings (the suite is compile-bound on a 2-core machine):

* one persistent JAX compilation cache for the whole run, shared by this process, pytest-xdist
  workers and the training subprocesses (``subprocess_env``), so an identical program compiles once
  per run; it lives in a temporary directory removed when the run ends, so nothing leaks between runs;
* XLA's LLVM backend at ``-O0`` (``TEST_XLA_OPT``): every HLO pass (fusion, layout, sharding) still
  runs, only machine-code optimisation is skipped, which halves compile time
  (``tests/test_logprobs.py``: 160 -> 81 s of backend compile), and XLA:CPU's classic elemental
  fusion emitters instead of its MLIR fusion emitters (``--xla_cpu_use_fusion_emitters=false``), which
  compile a small program about 5x faster at -O0 (1-layer tiny DPO step: 2.3 -> 0.5 s;
  test_train_step.py + test_attention.py: 75 -> 43 s). Tests check numerics, not codegen speed;
  benchmarks under ``bench/`` never run with it. Set ``JAXPREF_TEST_XLA_OPT=""`` to test at the
  default settings.
"""

from __future__ import annotations

import atexit
import os
import pathlib
import shutil
import tempfile

TEST_XLA_OPT = os.environ.setdefault("JAXPREF_TEST_XLA_OPT",
                                      "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false")


def xla_flags(devices: int) -> str:
    """``XLA_FLAGS`` for a test process or subprocess with ``devices`` fake CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {TEST_XLA_OPT}".strip()


if "JAXPREF_TEST_JIT_CACHE" not in os.environ:  # the first process of the run (xdist workers inherit it)
    os.environ["JAXPREF_TEST_JIT_CACHE"] = tempfile.mkdtemp(prefix="jaxpref-test-jit-cache-")
    atexit.register(shutil.rmtree, os.environ["JAXPREF_TEST_JIT_CACHE"], True)
JIT_CACHE_ENV = {"JAX_COMPILATION_CACHE_DIR": os.environ["JAXPREF_TEST_JIT_CACHE"],
                 "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                 "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
for _key, _value in JIT_CACHE_ENV.items():
    os.environ.setdefault(_key, _value)
if "JAXPREF_GGUF_CACHE" not in os.environ:  # one converted-GGUF cache for the run (jaxpref.models.gguf_cache)
    os.environ["JAXPREF_GGUF_CACHE"] = tempfile.mkdtemp(prefix="jaxpref-test-gguf-cache-")
    atexit.register(shutil.rmtree, os.environ["JAXPREF_GGUF_CACHE"], True)
os.environ.setdefault("XLA_FLAGS", xla_flags(8))
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


# The longest test files (seconds on the 2-core CI machine, from ``--durations``), started first so the
# two xdist workers do not end with one long file running alone; the rest keep their collection order.
LONGEST_FILES = ("test_readme_commands.py", "test_repro_razin.py", "test_gguf_io.py", "test_wro.py",
                 "test_crosscheck.py", "test_demo.py", "test_repro_chen_liu.py", "test_reliability.py",
                 "test_accelerator_suite.py", "test_eval_during_training.py", "test_scan_layers.py", "test_plan.py",
                 "test_shared_prompt.py", "test_sweep.py")


def _file_rank(item) -> int:
    name = item.path.name
    return LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)


def pytest_collection_modifyitems(config, items):
    """Longest files first (stable, so tests of a file keep their order); skips ``gpu``-marked tests, with
    a reason, unless JAX's default backend is an accelerator."""
    items.sort(key=_file_rank)
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
def subprocess_env() -> dict[str, str]:
    """Environment for training subprocesses: one CPU device (cheaper compiles than eight) and the
    run's persistent compilation cache, so identical tiny runs compile only once."""
    return {**os.environ, "XLA_FLAGS": xla_flags(1), **JIT_CACHE_ENV}


@pytest.fixture(scope="module")
def pairs8(shared_data, tmp_path_factory):
    """The first 8 HH-RLHF pairs in a file of their own (training and held-out data at once)."""
    path = tmp_path_factory.mktemp("pairs") / "hh8.jsonl"
    with (shared_data / "hh_rlhf_helpful_base_test_2k.jsonl").open() as f:
        path.write_text("".join(next(f) for _ in range(8)))
    return path
