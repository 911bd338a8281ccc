"""Optax optimizers and schedules from :class:`jaxpref.config.OptimConfig`.

AdamW is the TRL default; RMSProp is what Razin et al. (2025, App. H) use for every DPO / IPO
run (lr 1e-7, no momentum). Weight decay skips 1-D parameters (norm scales and biases) unless
``decay_norms_and_biases`` is set.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxpref.config import OptimConfig


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to ``cfg.lr`` then constant / cosine / linear decay to ``lr * end_factor``."""
    warmup = max(int(cfg.warmup_steps), 0)
    decay_steps = max(int(total_steps) - warmup, 1)
    end = cfg.lr * cfg.end_factor
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.end_factor)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        raise ValueError(f"optim.schedule: unknown schedule {cfg.schedule!r}")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def decay_mask(params, include_1d: bool = False):
    """True for parameters that get weight decay: matrices (and 1-D ones if ``include_1d``)."""
    return jax.tree.map(lambda p: include_1d or jnp.ndim(p) > 1, params)


def with_state_dtype(inner: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
    """``inner`` run in ``dtype``: its state is initialised from, and its updates computed with, the
    parameters and gradients cast to ``dtype`` (mixed precision: float32 Adam moments of bfloat16
    parameters); :func:`optax.apply_updates` casts the updates back to each parameter's dtype."""
    dtype = jnp.dtype(dtype)
    cast = lambda tree: jax.tree.map(lambda x: x.astype(dtype) if hasattr(x, "astype") else x, tree)  # noqa: E731

    def init(params):
        return inner.init(cast(params))

    def update(updates, state, params=None):
        return inner.update(cast(updates), state, None if params is None else cast(params))

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Builds the optimizer chain: clip -> base optimizer (with schedule) -> masked weight decay, in
    ``cfg.state_dtype`` when set (:func:`with_state_dtype`)."""
    tx, schedule = _make_optimizer(cfg, total_steps)
    return (tx if cfg.state_dtype is None else with_state_dtype(tx, cfg.state_dtype)), schedule


def _make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(cfg, total_steps)
    mask = lambda params: decay_mask(params, cfg.decay_norms_and_biases)
    parts: list[optax.GradientTransformation] = []
    if cfg.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    if cfg.name == "adamw":
        parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                 mask=mask))
        return optax.chain(*parts), schedule
    if cfg.weight_decay:
        parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=mask))
    if cfg.name == "adam":
        parts.append(optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
    elif cfg.name == "rmsprop":
        parts.append(optax.rmsprop(schedule, decay=cfg.b2, eps=cfg.eps, momentum=cfg.momentum or None))
    elif cfg.name == "sgd":
        parts.append(optax.sgd(schedule, momentum=cfg.momentum or None))
    elif cfg.name == "adafactor":
        parts.append(optax.adafactor(schedule))
    else:
        raise ValueError(f"optim.name: unknown optimizer {cfg.name!r}")
    return optax.chain(*parts), schedule
