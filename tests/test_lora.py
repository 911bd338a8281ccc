"""LoRA adapters (``jaxpref.models.lora``) on the tiny Llama.

Adapters exist explicitly with the logical axes of the weights they adapt, start at B = 0 (the base's logits
bitwise), receive gradients, and once non-zero change the logits to exactly those of the weights
``W + alpha / r * A B`` computed here in NumPy; stacked (``scan_layers``) and unrolled adapters agree; bad
``lora.targets`` / ``lora.rank`` are one-line errors. The quantised base stays within half a quantisation
step of every weight, and its logits equal the float model built from the dequantised weights.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpref import parallel
from jaxpref.config import ConfigError, RunConfig, load_config
from jaxpref.models import build_model, lora, presets
from jaxpref.models.layer_stack import unstack_layers

IDS = (np.arange(24).reshape(2, 12) * 7 + 3) % 128


def logits(model):
    return np.asarray(model(IDS, segment_ids=np.ones_like(IDS), return_logits=True).logits)


@pytest.fixture(scope="module")
def base_logits():
    return logits(build_model(presets.tiny_llama()))


@pytest.fixture(scope="module", params=[False, True], ids=["unrolled", "stacked"])
def adapted(request):
    model = build_model(presets.tiny_llama(scan_layers=request.param))
    base_graphdef, before = nnx.graphdef(model), logits(model)
    paths = lora.attach(model, rank=4, alpha=8.0, seed=1)
    return model, base_graphdef, paths, request.param, before


def flat(state) -> dict[str, jax.Array]:
    return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}


def test_adapters_exist_with_logical_axes_and_start_at_the_base(adapted):
    model, _, paths, stacked, base_logits = adapted
    names = ("query_dnh", "key_dkh", "value_dkh", "out_nhd", "gate_df", "up_df", "down_fd")
    layers = ["layers"] if stacked else ["layers.0", "layers.1"]
    want = {f"{lay}.{'attn' if n in names[:4] else 'mlp'}.{n}" for lay in layers for n in names}
    assert set(paths) == want
    adapters = flat(nnx.state(model, nnx.LoRAParam))
    assert set(adapters) == {p + s for p in want for s in ("_lora_a", "_lora_b")}
    lead = (2,) if stacked else ()
    q = "layers" if stacked else "layers.0"
    assert adapters[f"{q}.attn.query_dnh_lora_a"].shape == (*lead, 32, 4)  # [(L,) embed, r]
    assert adapters[f"{q}.attn.query_dnh_lora_b"].shape == (*lead, 4, 4, 8)  # [(L,) r, heads, head_dim]
    assert adapters[f"{q}.attn.out_nhd_lora_a"].shape == (*lead, 4, 8, 4)  # [(L,) heads, head_dim, r]
    var = nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
    axes = {".".join(map(str, p)): v.get_metadata()["out_sharding"] for p, v in var}
    lay = ("layers",) if stacked else ()
    assert axes[f"{q}.attn.query_dnh_lora_a"] == (*lay, "embed", "lora_rank")
    assert axes[f"{q}.mlp.down_fd_lora_b"] == (*lay, "lora_rank", "embed")
    if len(jax.devices()) >= 8:  # adapters shard like the weights they adapt; the rank axis is replicated
        mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])
        specs = {".".join(map(str, p)): tuple(s.spec) for p, s in nnx.to_flat_state(
            parallel.state_shardings(nnx.state(model, nnx.LoRAParam), mesh))}
        assert specs[f"{q}.attn.query_dnh_lora_a"] == (*[None] * len(lay), "fsdp", None)
        assert specs[f"{q}.mlp.gate_df_lora_b"] == (*[None] * len(lay), None, "tensor")
    assert all(not np.any(v) for k, v in adapters.items() if k.endswith("_lora_b"))
    assert all(np.any(v) for k, v in adapters.items() if k.endswith("_lora_a"))
    np.testing.assert_array_equal(logits(model), base_logits)


def test_adapters_get_gradients_and_match_merged_weights(adapted):
    model, base_graphdef, _, stacked, base_logits = adapted
    graphdef, adapters, base, rest = nnx.split(model, nnx.LoRAParam, nnx.Param, ...)

    def loss(ad):
        out = nnx.merge(graphdef, ad, base, rest)(IDS, segment_ids=jnp.ones_like(IDS), return_logits=True)
        return jnp.sum(out.logits * jnp.cos(jnp.arange(out.logits.shape[-1])))

    grads = flat(jax.grad(loss)(adapters))
    assert all(np.any(g) for k, g in grads.items() if k.endswith("_lora_b"))  # dL/dA = 0 while B = 0
    # Non-zero B: the logits become those of W + alpha / r * A B, merged here with NumPy.
    rng = np.random.default_rng(0)
    new = nnx.clone(model)
    merged_w = {}
    for site in lora.adapted_sites(new):
        b = getattr(site.module, site.name + "_lora_b")
        b.set_value(jnp.asarray(rng.normal(0, 0.2, b.get_value().shape), jnp.float32))
        a = np.asarray(getattr(site.module, site.name + "_lora_a").get_value(), np.float64)
        w = np.asarray(site.var.get_value(), np.float64)
        bb = np.asarray(b.get_value(), np.float64)
        n_in, r = site.n_in, a.shape[-1]
        if stacked:
            upd = np.stack([(a[i].reshape(-1, r) @ bb[i].reshape(r, -1)).reshape(w.shape[1:]) for i in range(2)])
        else:
            upd = (a.reshape(-1, r) @ bb.reshape(r, -1)).reshape(w.shape)
        assert n_in in (1, 2)
        merged_w[site.path] = (w + 2.0 * upd).astype(np.float32)
    got = logits(new)
    assert np.abs(got - base_logits).max() > 0.1  # the adapters change the outputs
    plain = nnx.merge(base_graphdef, nnx.state(build_model(presets.tiny_llama(scan_layers=stacked)), nnx.Param),
                      rest)
    for site in lora.sites(plain):
        site.var.set_value(jnp.asarray(merged_w[site.path]))
    # f32: the low-rank path and the merged matmul round differently; logits are O(1) after 2 layers
    np.testing.assert_allclose(got, logits(plain), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(logits(lora.merged(new)), logits(plain), atol=2e-5, rtol=1e-5)
    # The base graph over the base parameters: the adapters off, the base's logits bitwise.
    ref = nnx.merge(base_graphdef, *nnx.split(new, nnx.LoRAParam, nnx.Param, ...)[2:])
    np.testing.assert_array_equal(logits(ref), base_logits)


def test_stacked_and_unrolled_adapters_agree():
    stacked = build_model(presets.tiny_llama(scan_layers=True))
    unrolled = build_model(presets.tiny_llama())
    for m in (stacked, unrolled):
        lora.attach(m, rank=2, alpha=4.0, targets=r"attn\.(query|value)")
    for site in lora.adapted_sites(stacked):
        b = getattr(site.module, site.name + "_lora_b")
        b.set_value(b.get_value() + 0.3)
    nnx.update(unrolled, unstack_layers(nnx.state(stacked, nnx.LoRAParam)))
    assert {p for p in flat(nnx.state(unrolled, nnx.LoRAParam))} == {
        f"layers.{i}.attn.{n}_lora_{s}" for i in (0, 1) for n in ("query_dnh", "value_dkh") for s in "ab"}
    np.testing.assert_allclose(logits(stacked), logits(unrolled), atol=1e-6, rtol=1e-6)


def test_bad_targets_and_rank_are_one_line_errors():
    model = build_model(presets.tiny_llama())
    with pytest.raises(ConfigError, match=r"lora.targets='nothing_here' matches no projection weight"):
        lora.attach(model, rank=4, alpha=8.0, targets="nothing_here")
    with pytest.raises(ConfigError, match=r"lora.targets='\(': not a valid regular expression"):
        lora.attach(model, rank=4, alpha=8.0, targets="(")
    with pytest.raises(ConfigError, match=r"lora.rank=0: expected a positive integer"):
        load_config(RunConfig, None, ["lora={rank: 0}"])
    with pytest.raises(ConfigError, match=r"lora.rank=-2"):
        lora.attach(model, rank=-2, alpha=8.0)
    with pytest.raises(ConfigError, match=r"lora.quantize='int3'"):
        load_config(RunConfig, None, ["lora={quantize: int3}"])
    with pytest.raises(ConfigError, match=r"lora is not set: set the section itself"):
        load_config(RunConfig, None, ["lora.rank=4"])
    assert not lora.has_adapters(model)


def test_peft_directory_round_trip_between_layouts(tmp_path):
    """A stacked model's adapters written as a PEFT directory load into an unrolled model: the same logits."""
    import json

    from jaxpref.models import lora_peft

    stacked = build_model(presets.tiny_llama(scan_layers=True))
    lora.attach(stacked, rank=3, alpha=6.0, targets=r"(value_dkh|down_fd)$")
    for site in lora.adapted_sites(stacked):
        b = getattr(site.module, site.name + "_lora_b")
        b.set_value(b.get_value() + 0.2)
    lora_peft.save_adapter(stacked, tmp_path, base_name="some/base")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["target_modules"]) == (3, 6.0, ["down_proj", "v_proj"])
    unrolled = build_model(presets.tiny_llama())
    assert sorted(lora_peft.load_adapter(unrolled, tmp_path, base_spec="some/base")) == [
        f"layers.{i}.{m}" for i in (0, 1) for m in ("attn.value_dkh", "mlp.down_fd")]
    np.testing.assert_allclose(logits(unrolled), logits(stacked), atol=1e-6, rtol=1e-6)
