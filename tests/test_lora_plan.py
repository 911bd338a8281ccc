"""``train.plan`` of LoRA and QLoRA runs: the trained parameters and optimizer state are the adapters', the
frozen base (the reference) is counted once, quantised when asked, and the step's peak is below full DPO's.
Bytes are checked against counts made here from the architecture (tiny Llama, one device)."""

import jax
import pytest

from jaxpref.config import RunConfig, load_config
from jaxpref.models import presets
from jaxpref.training import plan as planlib
from train import plan as plan_cli

TINY = ["model.source=preset:tiny_llama", "model.tokenizer=builtin", "model.overrides={vocab_size: 512}",
        "data.max_length=32", "data.buckets=[32]", "train.batch_size=8", "train.seq_chunk=16",
        "train.vocab_chunk=256", "mesh.data=1", "logging.progress=false"]
CFG = presets.tiny_llama(vocab_size=512)
R = 4


def projection_shapes(c) -> list[tuple[int, int]]:
    """``(in, out)`` features of the 7 projections of one layer."""
    d, f, q, kv = c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]


@pytest.fixture(scope="module")
def plans():
    one = jax.devices()[:1]
    full = planlib.plan(load_config(RunConfig, None, TINY), devices=one)
    qlora = plan_cli.main([*TINY, f"lora={{rank: {R}, alpha: 8, quantize: int8}}", "--devices", "1"])
    return full, qlora


def test_lora_plan_counts_adapters_and_a_quantised_base(plans):
    full, qlora = plans
    per_layer = projection_shapes(CFG)
    adapters = CFG.num_layers * sum(R * (i + o) for i, o in per_layer)
    assert qlora["lora"]["trainable_params"] == adapters
    b = qlora["bytes_per_device"]
    assert b["params"] == 4 * adapters  # float32 adapters
    assert 2 * b["params"] <= b["optimizer"] <= 2 * b["params"] + 64  # Adam's two moments (+ step counts)
    proj = CFG.num_layers * sum(i * o for i, o in per_layer)
    scales = CFG.num_layers * sum(o for _, o in per_layer)  # one float32 step per output channel
    assert b["reference"] == proj * 1 + scales * 4 + (CFG.num_params() - proj) * 4
    f = full["bytes_per_device"]
    assert f["params"] == f["reference"] == 4 * CFG.num_params()
    assert qlora["compiled"]["peak"] < full["compiled"]["peak"]
    assert "lora" not in full


def test_lora_plan_table_names_adapters_and_frozen_base(plans):
    text = planlib.format_plan(plans[1])
    assert f"LoRA r={R} ({plans[1]['lora']['trainable_params']:,} trainable, base int8)" in text
    assert "adapters (trained)" in text and "frozen base (= reference)" in text


def test_int4_counts_half_a_byte():
    sds = jax.ShapeDtypeStruct((6, 4), "int4", sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    assert planlib.per_device_bytes([sds]) == 12


def test_lora_reward_models_are_not_planned_yet():
    with pytest.raises(planlib.PlanError, match="does not model LoRA reward models"):
        planlib.plan(load_config(RunConfig, None, [*TINY, "lora={}"]), kind="reward", devices=jax.devices()[:1])
