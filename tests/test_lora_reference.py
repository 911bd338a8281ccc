"""LoRA with a reference other than its base (``reference.source``): the step takes ``(frozen base, reference)``
and runs the reference with its own graph. At B = 0 the LoRA step's loss, log-probs and reference equal those of
a full-parameter step whose policy is the base and whose reference is that other model (float32 rounding of two
programs over the same numbers)."""

import jax
import numpy as np
import optax
from flax import nnx
from test_lora_train import make_batch

from jaxpref import losses
from jaxpref.models import build_model, lora, presets
from jaxpref.training import step as steplib

CHUNKS = {"seq_chunk": 16, "vocab_chunk": 64}


def test_lora_step_with_its_own_reference_equals_the_full_step():
    comp = losses.compose([{"name": "sigmoid"}])
    optimizer = optax.sgd(1e-2)
    other = build_model(presets.tiny_llama(), rngs=7)
    ref_graphdef, ref_params, _ = nnx.split(other, nnx.Param, ...)
    batch = make_batch(other.config.vocab_size)

    full = build_model(presets.tiny_llama())
    graphdef, params, rest = steplib.split_model(full)
    full_step = jax.jit(steplib.make_preference_step(graphdef, rest, optimizer, comp, **CHUNKS))
    _, want = full_step(steplib.init_state(params, optimizer, 0), ref_params, batch, None)

    model = build_model(presets.tiny_llama())
    base_graphdef = nnx.graphdef(model)
    lora.attach(model, rank=4, alpha=8.0)
    parts = lora.split(model, base_graphdef)
    lora_step = jax.jit(steplib.make_preference_step(parts["graphdef"], parts["rest"], optimizer, comp,
                                                     base_graphdef=base_graphdef, reference_graphdef=ref_graphdef,
                                                     **CHUNKS))
    state = steplib.init_state(parts["adapters"], optimizer, 0)
    _, got = lora_step(state, (parts["base"], ref_params), batch, None)
    assert abs(float(want["loss"]) - np.log(2)) > 1e-3  # the other model is a different reference
    for key in ("loss", "logps/chosen", "logps/rejected", "sigmoid/rewards/margins"):
        np.testing.assert_allclose(float(got[key]), float(want[key]), rtol=1e-6, atol=1e-6, err_msg=key)
