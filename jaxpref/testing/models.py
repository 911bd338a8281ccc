"""Tiny jaxpref models with random weights, built without compiling anything.

``build_model`` initialises with one jitted program, which is the right thing for real
models but costs seconds of XLA compile time per config on a loaded CPU. Unit tests only
need *some* well-spread weights, so :func:`random_model` fills an abstract model from NumPy:
matrices ``N(0, std)``, norm scales ``1 + N(0, 0.1)`` (``N(0, 0.1)`` for Gemma's ``1 + w``
norm), biases ``N(0, 0.1)`` -- the same scheme as :mod:`jaxpref.testing.hf_factory`.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpref.models.config import ModelConfig
from jaxpref.models.registry import abstract_model
from jaxpref.models.transformer import CausalLM


def random_model(config: ModelConfig, seed: int = 0, std: float = 0.2) -> CausalLM:
    """A model of ``config`` with NumPy-drawn weights (deterministic in ``seed``)."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(abstract_model(config))
    for path, var in nnx.to_flat_state(state):
        shape, name = var.get_value().shape, str(path[-1])
        noise = rng.standard_normal(shape)
        if name == "scale_d" and config.traits.norm != "rms_plus_one":
            value = 1.0 + 0.1 * noise
        elif name.startswith("scale") or "bias" in name:
            value = 0.1 * noise
        else:
            value = std * noise
        var.set_value(jnp.asarray(value, config.jnp_param_dtype))
    return nnx.merge(graphdef, state)


@contextlib.contextmanager
def fast_compile():
    """Turns off most XLA optimisations inside the block: tiny test programs compile 2-3x faster.

    Use as a module-scoped fixture; the previous setting is restored on exit.
    """
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)
