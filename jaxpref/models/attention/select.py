"""Which attention backend runs: ``model.attention`` resolved for the platform and the mask.

``auto`` (the default) picks per call site, at trace time (shapes are static):

* one-token decoding (``T = 1``) -> ``xla``: its scores are ``[B, H, 1, S]``, already O(S);
* key length ``S >= AUTO_BLOCKED_MIN_LEN`` -> ``blocked``, shorter -> ``xla``.

The threshold comes from ``bench/attention_cpu.py`` (``bench/results/attention_cpu.json``:
fwd + bwd of one attention layer, a right-padded causal pair, tiny heads, on CPU). Up to
S = 512 ``blocked`` is a single 512 x 512 tile: the same memory as ``xla``, no tile to skip,
timings within noise of each other, and twice the compile time. From S = 1024 on it has dead
tiles to skip and wins on both counts (T = 1024: about 3x faster, 18 vs 66 MiB temp; the
dense temporaries grow as S^2). Until the kernel backends land, GPU and TPU use the same rule.

An explicit choice runs as asked, with one exception that is logged: one-token decode steps
under ``blocked`` use ``xla`` (a single query row has nothing to tile). ``cudnn``, ``splash``
and ``pallas_gpu`` are known names whose kernels are not in this version yet: choosing one is
a :class:`~jaxpref.config.ConfigError` naming ``model.attention`` when the model is built,
before anything compiles (so is any backend on a platform it cannot run on, e.g. ``splash``
on CPU).

Every backend module implements ``attend(q [B,T,H,hd], k [B,S,KV,hd], v, spec: MaskSpec, *,
scale) -> [B,T,H,hd]`` with the semantics of :func:`jaxpref.models.attention.xla.attend`.
"""

from __future__ import annotations

import logging

import jax

from jaxpref.config import ConfigError
from jaxpref.models.attention import blocked, xla
from jaxpref.models.attention.mask import MaskSpec
from jaxpref.models.config import ATTENTION_BACKENDS

log = logging.getLogger(__name__)

BACKENDS = ATTENTION_BACKENDS
IMPLEMENTATIONS = {"xla": xla.attend, "blocked": blocked.attend}
# Known kernels not implemented yet, with the platforms they need.
PLANNED = {"cudnn": ("gpu",), "splash": ("tpu",), "pallas_gpu": ("gpu",)}
AUTO_BLOCKED_MIN_LEN = 1024

_logged: set[tuple] = set()


def platform() -> str:
    """``cpu``, ``gpu`` or ``tpu`` (of the default backend)."""
    return jax.default_backend()


def check_backend(name: str, on: str | None = None) -> None:
    """Raises :class:`ConfigError` (one line naming ``model.attention``) unless ``name`` can run on ``on``."""
    on = on or platform()
    if name not in BACKENDS:
        raise ConfigError(f"model.attention={name!r}: expected one of {list(BACKENDS)}")
    if name in PLANNED:
        needs = PLANNED[name]
        why = (f"needs {' or '.join(needs)}, this platform is {on}" if on not in needs
               else "is not implemented in this version")
        raise ConfigError(f"model.attention={name!r} {why}; available here: auto, {', '.join(IMPLEMENTATIONS)}")


def resolve(name: str, spec: MaskSpec) -> str:
    """The implemented backend that serves ``spec`` for the request ``name`` (logs each new choice once)."""
    if name == "auto":
        if spec.q_len == 1:
            choice, why = "xla", "one-token decode"
        elif spec.kv_len >= AUTO_BLOCKED_MIN_LEN:
            choice, why = "blocked", f"key length {spec.kv_len} >= {AUTO_BLOCKED_MIN_LEN}"
        else:
            choice, why = "xla", f"key length {spec.kv_len} < {AUTO_BLOCKED_MIN_LEN}"
    elif name == "blocked" and spec.q_len == 1:
        choice, why = "xla", "one-token decode has nothing to tile"
    elif name in IMPLEMENTATIONS:
        return name
    else:
        check_backend(name)
        raise AssertionError(name)  # check_backend raised
    key = (name, choice, why)
    if key not in _logged:
        _logged.add(key)
        log.info("model.attention=%s: using %s (%s, %s)", name, choice, why, platform())
    return choice


def attend(q: jax.Array, k: jax.Array, v: jax.Array, spec: MaskSpec, backend: str = "auto", *,
           scale: float | None = None) -> jax.Array:
    """Softmax attention of ``q`` over ``k``/``v`` under the mask ``spec``, by ``backend``.

    Args:
      q: [B, T, H, hd] queries (RoPE applied).
      k, v: [B, S, KV, hd] keys / values, H % KV == 0 (GQA / MQA without repeating K/V).
      spec: :class:`MaskSpec` (segments, positions, causal, window, soft-cap).
      backend: a :data:`BACKENDS` name.
      scale: score scale, default ``hd ** -0.5``.

    Returns:
      [B, T, H, hd] in q's dtype; zeros for queries that see no key.
    """
    spec.validate(q.shape, k.shape)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return IMPLEMENTATIONS[resolve(backend, spec)](q, k, v, spec, scale=scale)
