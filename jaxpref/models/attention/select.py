"""Which attention backend runs: ``model.attention`` resolved for the platform and the mask.

Backends:

* ``xla`` -- dense reference math (:mod:`.xla`), every platform;
* ``blocked`` -- pure-JAX flash attention (:mod:`.blocked`), every platform, every mask;
* ``cudnn`` -- cuDNN's fused kernel (:mod:`.cudnn`), NVIDIA GPUs, right-padded causal masks
  (with or without a window), bf16 / f16, no soft-cap;
* ``pallas_gpu`` -- the Pallas (Triton) flash kernel (:mod:`.pallas_gpu`), GPUs, packed or padded
  self-attention without window or soft-cap;
* ``splash`` -- Pallas splash attention (:mod:`.splash`), TPUs, packed or padded self-attention with
  window and soft-cap.

``auto`` (the default) picks per call site, at trace time (shapes are static):

* one-token decoding (``T = 1``) -> ``xla``: its scores are ``[B, H, 1, S]``, already O(S);
* on a GPU or TPU, the first kernel of :data:`AUTO_KERNELS` for the platform that serves the mask;
* otherwise key length ``S >= AUTO_BLOCKED_MIN_LEN`` -> ``blocked``, shorter -> ``xla``.

The CPU threshold comes from ``bench/attention_cpu.py`` (``bench/results/attention_cpu.json``:
fwd + bwd of one attention layer, a right-padded causal pair, tiny heads, on CPU). Up to
S = 512 ``blocked`` is a single 512 x 512 tile: the same memory as ``xla``, no tile to skip,
timings within noise of each other, and twice the compile time. From S = 1024 on it has dead
tiles to skip and wins on both counts (T = 1024: about 3x faster, 18 vs 66 MiB temp; the
dense temporaries grow as S^2). The GPU order is the accelerator suite's measurement
(``bench/accelerator_suite.py``).

An explicit choice runs as asked when it can serve the mask. When a kernel cannot (e.g.
``cudnn`` for packed segments or float32 inputs), the call falls back to what ``auto`` would
pick without that kernel, and logs the reason once. One-token decode steps always use ``xla``
(a single query row has nothing to tile). A backend that cannot run on this platform at all
(``cudnn`` or ``pallas_gpu`` on CPU, ``splash`` off TPU) is a
:class:`~jaxpref.config.ConfigError` naming ``model.attention`` when the model is built, before
anything compiles.

Every backend module implements ``attend(q [B,T,H,hd], k [B,S,KV,hd], v, spec: MaskSpec, *,
scale) -> [B,T,H,hd]`` with the semantics of :func:`jaxpref.models.attention.xla.attend`;
kernel modules add ``unsupported(spec, dtype, head_dim) -> reason | None`` and ``PLATFORMS``.
"""

from __future__ import annotations

import logging

import jax

from jaxpref.config import ConfigError
from jaxpref.models.attention import blocked, cudnn, pallas_gpu, splash, xla
from jaxpref.models.attention.mask import MaskSpec
from jaxpref.models.config import ATTENTION_BACKENDS

log = logging.getLogger(__name__)

BACKENDS = ATTENTION_BACKENDS
IMPLEMENTATIONS = {"xla": xla.attend, "blocked": blocked.attend, "cudnn": cudnn.attend,
                   "pallas_gpu": pallas_gpu.attend, "splash": splash.attend}
KERNELS = {"cudnn": cudnn, "pallas_gpu": pallas_gpu, "splash": splash}  # platform-bound, mask-limited
# What ``auto`` tries first, per platform (then the portable rule).
AUTO_KERNELS: dict[str, tuple[str, ...]] = {"gpu": ("cudnn",), "tpu": ("splash",)}
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
    here = ["auto", "xla", "blocked", *(k for k, m in KERNELS.items() if on in m.PLATFORMS)]
    if name in KERNELS and on not in KERNELS[name].PLATFORMS:
        raise ConfigError(f"model.attention={name!r} needs {' or '.join(KERNELS[name].PLATFORMS)}, this platform "
                          f"is {on}; available here: {', '.join(here)}")


def _portable(spec: MaskSpec) -> tuple[str, str]:
    if spec.kv_len >= AUTO_BLOCKED_MIN_LEN:
        return "blocked", f"key length {spec.kv_len} >= {AUTO_BLOCKED_MIN_LEN}"
    return "xla", f"key length {spec.kv_len} < {AUTO_BLOCKED_MIN_LEN}"


def resolve(name: str, spec: MaskSpec, dtype=None, head_dim: int | None = None) -> str:
    """The implemented backend that serves ``spec`` for the request ``name`` (logs each new choice once).

    Args:
      name: a :data:`BACKENDS` name.
      spec: the mask description.
      dtype, head_dim: of the queries (kernels have dtype and head-size limits); None = unknown,
        which no kernel accepts for ``auto`` and every explicit kernel is trusted with.
    """
    check_backend(name)
    on = platform()
    if spec.q_len == 1:
        if name == "xla":
            return name
        choice, why = "xla", "one-token decode"
    elif name == "auto":
        choice = None
        if dtype is not None and head_dim is not None:
            for kernel in AUTO_KERNELS.get(on, ()):
                if KERNELS[kernel].unsupported(spec, dtype, head_dim) is None:
                    choice, why = kernel, "serves this mask"
                    break
        if choice is None:
            choice, why = _portable(spec)
    elif name in KERNELS:
        reason = None if dtype is None or head_dim is None else KERNELS[name].unsupported(spec, dtype, head_dim)
        if reason is None:
            return name
        choice, portable_why = _portable(spec)
        why = f"{name} cannot serve it: {reason}; {portable_why}"
    else:
        return name
    key = (name, choice, why)
    if key not in _logged:
        _logged.add(key)
        log.info("model.attention=%s: using %s (%s, %s)", name, choice, why, on)
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
    return IMPLEMENTATIONS[resolve(backend, spec, q.dtype, q.shape[-1])](q, k, v, spec, scale=scale)
