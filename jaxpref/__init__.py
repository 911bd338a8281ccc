"""jaxpref: accelerator-native preference learning for language models in JAX/Flax.

Subpackages (imported on first use, so ``import jaxpref`` stays cheap):

* :mod:`jaxpref.logprobs` — chunked per-token / per-sequence log-probs (never ``[B, T, V]``);
* :mod:`jaxpref.losses` — the loss registry and compositions;
* :mod:`jaxpref.metrics` — jitted analysis metrics (difficulty, ranking, CHES, displacement, win rate);
* :mod:`jaxpref.models` — Flax ports of HF checkpoints, HF / GGUF / llama2c import and export;
* :mod:`jaxpref.generation` — jitted sampling with a KV cache;
* :mod:`jaxpref.data` — loading, validation, tokenisation, batching;
* :mod:`jaxpref.training` — the pure train step, reference strategies, checkpoints, loop;
* :mod:`jaxpref.evaluation` — evaluation glue: batched pair scoring, generation, judges, result files;
* :mod:`jaxpref.reward_model` — Bradley-Terry reward model (head, training, ``rm:`` judge);
* :mod:`jaxpref.parallel` — mesh, logical-axis rules, multi-host initialisation;
* :mod:`jaxpref.config` — typed run configs.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = ("config", "data", "evaluation", "generation", "loading", "logprobs", "losses", "metrics", "models",
               "parallel", "reward_model", "training", "types")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"jaxpref.{name}")
    raise AttributeError(f"module 'jaxpref' has no attribute {name!r}")


__all__ = list(_SUBMODULES)
