"""The persistent compilation cache (``jaxpref.compile_cache``): a second process running the same
jitted program loads it instead of compiling it, the cache can be switched off, and JAX's own setting wins.

Each case runs a fresh Python process, because the cache is chosen once per process."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

# Enables the cache the way the scripts do, then jits the chunked log-prob loss and its gradient (two
# programs) and reports JAX's own cache events.
SCRIPT = """
import collections, json
from jax._src import monitoring
events = collections.Counter()
monitoring.register_event_listener(lambda name, **kw: events.update([name]))
from jaxpref import compile_cache
where = compile_cache.enable()
import jax, jax.numpy as jnp
from jaxpref.logprobs import sequence_logprobs
h = jnp.linspace(-1, 1, 2 * 8 * 16).reshape(2, 8, 16)
w = jnp.linspace(-1, 1, 16 * 40).reshape(16, 40)
ids = jnp.arange(16).reshape(2, 8) % 40
mask = jnp.ones((2, 8))
f = jax.jit(lambda h, w: sequence_logprobs(h, w, ids, mask).sums.sum())
f(h, w).block_until_ready()
jax.jit(jax.grad(lambda h, w: sequence_logprobs(h, w, ids, mask).sums.sum(), argnums=1))(h, w).block_until_ready()
print(json.dumps({"dir": where, "hits": events["/jax/compilation_cache/cache_hits"],
                  "misses": events["/jax/compilation_cache/cache_misses"]}))
"""


def _run(env_updates: dict[str, str], tmp: pathlib.Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE", "JAXPREF_COMPILATION_CACHE"))}
    env.update({"XDG_CACHE_HOME": str(tmp / "xdg"), "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
                **env_updates})
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_process_compiles_nothing_and_the_cache_can_be_disabled(tmp_path):
    first = _run({}, tmp_path)
    assert first["dir"] == str(tmp_path / "xdg" / "jaxpref" / "jax-compilation-cache")
    assert first["hits"] == 0 and first["misses"] >= 2          # the loss and its gradient, at least
    assert any(pathlib.Path(first["dir"]).iterdir())
    second = _run({}, tmp_path)
    assert second == {**first, "hits": first["misses"], "misses": 0}

    entries = sorted(p.name for p in pathlib.Path(first["dir"]).iterdir())
    for off in ("off", "0"):
        disabled = _run({"JAXPREF_COMPILATION_CACHE": off}, tmp_path)
        assert disabled == {"dir": None, "hits": 0, "misses": 0}
    assert sorted(p.name for p in pathlib.Path(first["dir"]).iterdir()) == entries


def test_explicit_directories_take_precedence(tmp_path):
    mine = _run({"JAXPREF_COMPILATION_CACHE": str(tmp_path / "mine")}, tmp_path)
    assert mine["dir"] == str(tmp_path / "mine") and mine["misses"] >= 2
    jax_own = _run({"JAXPREF_COMPILATION_CACHE": str(tmp_path / "mine"),
                    "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_own")}, tmp_path)
    assert jax_own["dir"] == str(tmp_path / "jax_own") and jax_own["hits"] == 0
    assert not (tmp_path / "xdg").exists()
