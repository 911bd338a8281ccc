"""Family registry and model construction: which class implements a config, built how."""

from __future__ import annotations

import functools

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxpref.models.config import Family, ModelConfig
from jaxpref.models.families import Gemma2, Gemma3, Olmo2, Phi3, Qwen3
from jaxpref.models.gemma import Gemma
from jaxpref.models.gpt2 import GPT2
from jaxpref.models.gpt_neox import GPTNeoX
from jaxpref.models.llama import Llama
from jaxpref.models.transformer import CausalLM
from jaxpref.parallel import DEFAULT_RULES, state_shardings

MODEL_CLASSES: dict[Family, type[CausalLM]] = {
    family: cls for cls in (Llama, Gemma, GPT2, GPTNeoX, Qwen3, Gemma2, Gemma3, Olmo2, Phi3) for family in cls.FAMILIES
}


def model_class(family: Family | str) -> type[CausalLM]:
    """The model class for a family (e.g. ``"mistral" -> Llama``)."""
    try:
        return MODEL_CLASSES[Family(family)]
    except ValueError:
        raise KeyError(f"unknown model family {family!r}; registered: {[f.value for f in MODEL_CLASSES]}") from None


def abstract_model(config: ModelConfig) -> CausalLM:
    """The model with ``jax.ShapeDtypeStruct`` leaves: no memory, no compute (shapes, loading)."""
    return nnx.eval_shape(lambda: model_class(config.family)(config, rngs=nnx.Rngs(0)))


@functools.lru_cache(maxsize=32)
def _cached_init(config: ModelConfig, mesh: Mesh | None, rules):
    """(graphdef, jitted init) per architecture and placement: repeated builds (trainers, tests, sweeps in
    one process) reuse the compiled initialiser instead of tracing and compiling it again."""
    cls = model_class(config.family)
    graphdef, abstract_state = nnx.split(abstract_model(config))
    shardings = state_shardings(abstract_state, mesh, rules) if mesh is not None else None

    @jax.jit
    def init(key):
        state = nnx.state(cls(config, rngs=nnx.Rngs(params=key)))
        return state if shardings is None else jax.lax.with_sharding_constraint(state, shardings)

    return graphdef, init


def build_model(config: ModelConfig, rngs: nnx.Rngs | int = 0, *, mesh: Mesh | None = None,
                rules=DEFAULT_RULES) -> CausalLM:
    """A randomly initialised model (``normal(initializer_range)`` weights, unit norms, zero biases).

    Initialisation is one jitted computation (fast to compile, unlike op-by-op init) whose
    outputs are born with their target shardings when a ``mesh`` is given.

    Args:
      config: the architecture.
      rngs: ``nnx.Rngs`` (one ``params`` key is drawn from it) or an integer seed.
      mesh: shard parameters on this mesh by their logical axes (None: default device).
      rules: logical-to-mesh rules.
    """
    key = jax.random.key(rngs) if isinstance(rngs, int) else rngs.params()
    try:
        graphdef, init = _cached_init(config, mesh, rules)
    except TypeError:  # an unhashable config / rules: build (and compile) once for this call
        graphdef, init = _cached_init.__wrapped__(config, mesh, rules)
    return nnx.merge(graphdef, init(key))
