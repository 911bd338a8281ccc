"""``model.scan_layers``: stacked per-layer parameters run under ``lax.scan`` equal the unrolled loop.

Both layouts built from one seed hold the same weights (checked against ``np.stack`` of the unrolled
ones), so every comparison here is two float32 programs computing the same function: log-probs within
:func:`~jaxpref.testing.tolerances.token_logp_tol`, per-row gradients within the norm-wise backward-chain
bound that :func:`~jaxpref.testing.tolerances.dpo_step_bounds` uses. Then: remat inside the scan, KV-cache
generation, HF / GGUF / llama2.c import and export, Orbax checkpoints across layouts, ``run:`` specs, and
sharding on 8 fake devices.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpref import loading
from jaxpref.config import RunConfig, load_config
from jaxpref.generation import SamplingConfig, generate, left_pad
from jaxpref.models import ModelConfig, abstract_model, build_model, layer_stack, load_hf, presets, save_hf
from jaxpref.models.hf_io import hf_tensors
from jaxpref.parallel import MeshConfig, make_mesh, place_params
from jaxpref.testing.models import fast_compile, random_model
from jaxpref.testing.tolerances import logits_tol, relative_tol, token_logp_tol, transformer_chain_length
from jaxpref.training import checkpoint as ckpt

# Compile time dominates (~1.5 s of CPU per tiny forward + backward at the suite's -O0), so the models of
# each kind of check share one jitted program: a module fixture evaluates them all at once.
GRAD_FAMILIES = ("tiny_llama", "tiny_gpt2", "tiny_gemma3")  # log-probs and gradients (+ tiny_llama with remat)
FORWARD_FAMILIES = ("tiny_gemma", "tiny_gpt_neox", "tiny_mistral", "tiny_qwen2")  # log-probs
T = 12


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
    with fast_compile():
        yield


def _row(vocab: int):
    """One [1, T] row holding two packed sequences (7 + 3 tokens) and 2 padding slots."""
    ids = np.random.default_rng(0).integers(3, vocab, (1, T)).astype(np.int32)
    return ids, np.array([[1] * 7 + [2] * 3 + [0] * 2], np.int32)


def _pair_models(name: str, std: float = 0.2, **over):
    """(unrolled, scanned) with the same NumPy-drawn weights (no init program to compile); the stacking is
    :func:`jaxpref.models.layer_stack.stack_layers`, checked against ``np.stack`` in the first test."""
    cfg = presets.get_preset(name, **over)
    unrolled = random_model(cfg, std=std)
    graphdef, _ = nnx.split(abstract_model(cfg.replace(scan_layers=True)))
    return unrolled, nnx.merge(graphdef, layer_stack.stack_layers(nnx.state(unrolled)))


def _flat(tree) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v.get_value() if isinstance(v, nnx.Variable) else v)
            for p, v in nnx.to_flat_state(tree)}


def _stacked_view(unrolled: dict[str, np.ndarray], num_layers: int) -> dict[str, np.ndarray]:
    """``layers.{i}.X`` entries -> ``layers.X`` stacked on axis 0 (written here, apart from the library)."""
    out, per_layer = {}, {}
    for path, value in unrolled.items():
        parts = path.split(".")
        if parts[0] == "layers" and parts[1].isdigit():
            per_layer.setdefault(".".join(["layers", *parts[2:]]), {})[int(parts[1])] = value
        else:
            out[path] = value
    for path, layers in per_layer.items():
        assert sorted(layers) == list(range(num_layers))
        out[path] = np.stack([layers[i] for i in range(num_layers)])
    return out


def _row_logps(graphdef, params, rest, ids, seg):
    """[1, T-1] next-token log-probs of the row (0 across segment boundaries and on padding)."""
    logits = nnx.merge(graphdef, params, rest)(ids, segment_ids=seg, return_logits=True).logits
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None], -1)[..., 0]
    return jnp.where((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0), lp, 0.0)


def _sum_and_logps(params, graphdef, rest, ids, seg):
    lp = _row_logps(graphdef, params, rest, ids, seg)
    return lp.sum(), lp


@functools.partial(jax.jit, static_argnums=(0, 1))
def _evaluate(graphdefs, with_grads: bool, states, ids, seg):
    """For each model: (log-probs, gradient of the row's log-prob sum or None), all in one program."""
    out = []
    for graphdef, (params, rest) in zip(graphdefs, states, strict=True):
        if with_grads:
            grads, lp = jax.grad(_sum_and_logps, has_aux=True)(params, graphdef, rest, ids, seg)
            out.append((lp, grads))
        else:
            out.append((_row_logps(graphdef, params, rest, ids, seg), None))
    return out


def _evaluate_models(models: dict, with_grads: bool, ids, seg) -> dict:
    """name -> (log-probs [1, T-1], flat gradients in the stacked layout or None)."""
    split = {k: nnx.split(m, nnx.Param, ...) for k, m in models.items()}
    results = _evaluate(tuple(gd for gd, _, _ in split.values()), with_grads,
                        [(p, r) for _, p, r in split.values()], ids, seg)
    out = {}
    for (key, model), (lp, grads) in zip(models.items(), results, strict=True):
        if grads is not None:
            grads = _flat(grads)
            grads = grads if model.config.scan_layers else _stacked_view(grads, model.config.num_layers)
        out[key] = (np.asarray(lp), grads)
    return out


@pytest.fixture(scope="module")
def grad_results():
    """(family, layout) -> log-probs and gradients, layouts ``unrolled``, ``scanned``, ``scanned+remat``."""
    models = {}
    for name in GRAD_FAMILIES:
        models[name, "unrolled"], models[name, "scanned"] = _pair_models(name)
    scanned = models["tiny_llama", "scanned"]
    remat = abstract_model(scanned.config.replace(remat=True, remat_policy="full"))
    models["tiny_llama", "scanned+remat"] = nnx.merge(nnx.split(remat)[0], nnx.state(scanned))
    return models, _evaluate_models(models, True, *_row(128))


@pytest.fixture(scope="module")
def forward_results():
    models = {}
    for name in FORWARD_FAMILIES:
        models[name, "unrolled"], models[name, "scanned"] = _pair_models(name)
    return models, _evaluate_models(models, False, *_row(128))


def _assert_same_logps_and_grads(cfg: ModelConfig, got, want) -> None:
    (lp_a, g_a), (lp_b, g_b) = got, want
    err = np.abs(lp_a.astype(np.float64) - lp_b)
    tol = token_logp_tol(cfg, T, lp_b)
    assert np.all(err <= tol), f"log-probs: max excess {(err - tol).max():.3g}"
    assert np.abs(lp_b).max() > 1.0  # not trivially small
    assert g_a.keys() == g_b.keys()
    flat = lambda g: np.concatenate([np.asarray(g[k], np.float64).ravel() for k in sorted(g)])
    ga, gb = flat(g_a), flat(g_b)
    # the row's gradient: two float32 evaluations of the backward chain, norm-wise (tolerances.dpo_step_bounds)
    bound = relative_tol(transformer_chain_length(cfg, T, backward=True, tokens=T)) * np.linalg.norm(gb)
    assert np.linalg.norm(ga - gb) <= bound, f"gradients: ‖diff‖ {np.linalg.norm(ga - gb):.3g} > bound {bound:.3g}"
    assert np.linalg.norm(gb) > 1.0


def test_stacked_parameters_are_the_unrolled_layers():
    """``build_model`` in both layouts from one seed: the stacked arrays are the unrolled ones (np.stack)."""
    cfg = presets.tiny_llama()
    unrolled, scanned = build_model(cfg, rngs=0), build_model(cfg.replace(scan_layers=True), rngs=0)
    a, b = _flat(nnx.state(unrolled, nnx.Param)), _flat(nnx.state(scanned, nnx.Param))
    want = _stacked_view(a, 2)
    assert b.keys() == want.keys() and all(np.array_equal(b[k], want[k]) for k in want)
    q = scanned.layers.attn.query_dnh
    assert q.get_metadata()["out_sharding"] == ("layers", "embed", "heads", "head_dim") and q.shape == (2, 32, 4, 8)
    assert scanned.layers.mlp_norm.scale_d.get_metadata()["out_sharding"] == ("layers", "norm")
    back = layer_stack.unstack_layers(nnx.state(scanned, nnx.Param))
    assert jax.tree.structure(back) == jax.tree.structure(nnx.state(unrolled, nnx.Param))


@pytest.mark.parametrize("name", GRAD_FAMILIES)
def test_scanned_equals_unrolled_logps_and_gradients(grad_results, name):
    """tiny_llama: RoPE + GQA; tiny_gpt2: learned positions (outside the scan), biases, layer norms;
    tiny_gemma3: a mixed stack (local layer 0: window 4 < T, RoPE base 1e4; global layer 1: base 1e6, linear
    x8) whose kind is scanned with the parameters, q/k norms; one row with two packed sequences and padding."""
    models, results = grad_results
    _assert_same_logps_and_grads(models[name, "unrolled"].config, results[name, "scanned"],
                                 results[name, "unrolled"])


@pytest.mark.parametrize("name", FORWARD_FAMILIES)
def test_scanned_equals_unrolled_logps(forward_results, name):
    """tiny_gemma: (1 + w) norms, scaled embeddings, tied; tiny_gpt_neox: parallel residual, partial rotary;
    tiny_mistral: a 4-token window (shorter than T); tiny_qwen2: q/k/v biases."""
    models, results = forward_results
    want, got = results[name, "unrolled"][0].astype(np.float64), results[name, "scanned"][0]
    assert np.all(np.abs(got - want) <= token_logp_tol(models[name, "unrolled"].config, T, want))
    assert np.abs(want).max() > 1.0


def _saved_residual_bytes(fn, *args) -> int:
    import contextlib
    import io
    import re

    from jax import ad_checkpoint

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ad_checkpoint.print_saved_residuals(fn, *args)
    return sum(4 * int(np.prod([int(d) for d in dims.split(",") if d]))
               for dims in re.findall(r"^f32\[([\d,]*)\]", buf.getvalue(), flags=re.M))


def test_remat_inside_scan_same_gradients_fewer_residuals(grad_results):
    models, results = grad_results
    remat, scanned = models["tiny_llama", "scanned+remat"], models["tiny_llama", "scanned"]
    assert remat.config.remat and remat.config.scan_layers
    _assert_same_logps_and_grads(remat.config, results["tiny_llama", "scanned+remat"],
                                 results["tiny_llama", "unrolled"])
    ids, _ = _row(128)

    def residuals(model):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return _saved_residual_bytes(lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(ids).hidden ** 2), params)

    # the policy acts inside the scanned body: the backward keeps less of each layer (82.5 vs 158.6 KB when
    # written; the rest is what the scan itself carries)
    assert residuals(remat) < residuals(scanned), (residuals(remat), residuals(scanned))


def test_mixed_stack_keeps_one_branch_of_residuals():
    """A scanned Gemma 3 stack (local + global layer, ``lax.cond`` per layer) saves about what an all-global
    stack of the same shapes saves for the backward: the branches share residual slots, not one set each."""
    ids, _ = _row(128)

    def residuals(**over):
        _, scanned = _pair_models("tiny_gemma3", **over)
        graphdef, params, rest = nnx.split(scanned, nnx.Param, ...)
        return _saved_residual_bytes(lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(ids).hidden ** 2), params)

    mixed, uniform = residuals(), residuals(layer_types=("full_attention",) * 2)
    assert uniform < mixed < 1.1 * uniform, (mixed, uniform)  # 394 vs 380 KB when written


@pytest.mark.parametrize("name, over", [("tiny_mistral", {}), ("tiny_gemma3", {"tie_word_embeddings": False})],
                         ids=["tiny_mistral", "tiny_gemma3"])
def test_generation_equals_unrolled(name, over):
    """KV cache [L, B, S, KV, hd] decoding under the scan (a 4-token window, shorter than prompt + completion:
    on every layer for Mistral, on the local layer of Gemma 3, whose global layer uses the other RoPE table;
    untied, so random weights do not just repeat the last token): the unrolled model's greedy tokens,
    log-probs within the derived bound."""
    unrolled, scanned = _pair_models(name, std=0.5, **over)
    prompts = [[5, 17, 33, 9, 41], [7, 3], [11, 12, 13]]
    ids, mask = left_pad(prompts, pad_id=0, length=7)
    cfg = SamplingConfig(max_new_tokens=6, temperature=0.0)
    a = generate(scanned, ids, mask, key=jax.random.key(0), config=cfg)
    b = generate(unrolled, ids, mask, key=jax.random.key(0), config=cfg)
    np.testing.assert_array_equal(np.asarray(a.completion), np.asarray(b.completion))
    lp = np.asarray(b.logprobs, np.float64)
    assert np.all(np.abs(np.asarray(a.logprobs) - lp) <= token_logp_tol(unrolled.config, 13, lp))
    assert len(set(np.asarray(b.completion).ravel().tolist())) > 3  # not one repeated token
    cache = scanned.init_cache(3, 13)
    assert cache.k.shape == (2, 3, 13, scanned.config.num_kv_heads, scanned.config.head_dim)


# ------------------------------------------------------------------------------ checkpoints in both layouts


@pytest.mark.torch
@pytest.mark.parametrize("name", ["tiny_gpt2", "tiny_qwen2"])
def test_hf_parity_and_export_with_scan_layers(tmp_path, name):
    """transformers' logits from a scanned load; the scanned model exports the very tensors it loaded."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    from safetensors.numpy import load_file

    from jaxpref.testing.hf_factory import save_hf_model

    hf_model, src = save_hf_model(presets.get_preset(name), tmp_path / "src")
    model = load_hf(src, scan_layers=True)
    assert model.config.scan_layers and model.layers.attn.query_dnh.shape[0] == model.config.num_layers
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, (2, T)).astype(np.int32)
    mask = (np.arange(T)[None] < np.array([[T], [9]])).astype(np.int32)  # right padding (HF's attention mask)
    with torch.no_grad():
        want = hf_model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits
    out = nnx.jit(lambda m, i, s: m(i, segment_ids=s, return_logits=True))(model, ids, mask)
    matrix, layout = model.unembedding()
    w = np.asarray(matrix, np.float64)
    tol = logits_tol(model.config, T, out.hidden, w if layout == "dv" else w.T)
    valid = mask.astype(bool)
    assert np.all(np.abs(np.asarray(out.logits, np.float64) - want.numpy())[valid] <= tol[valid])
    exported = load_file(save_hf(model, tmp_path / "export") / "model.safetensors")
    source = load_file(src / "model.safetensors")
    assert exported.keys() == source.keys() and all(np.array_equal(exported[k], source[k]) for k in source)


def test_gguf_and_llama2c_load_stacked(tmp_path, shared_data):
    from test_gguf_io import _tiny_hf_state, write_tiny_gguf

    from jaxpref.models import gguf_io, load_llama2c

    write_tiny_gguf(tmp_path / "tiny.gguf", _tiny_hf_state(tied=False, qkv_bias=True), arch="qwen2",
                    tokenizer=False)
    stories = shared_data / "models" / "llama2c_stories260K" / "stories260K.bin"
    for load in (lambda **kw: gguf_io.load_gguf(tmp_path / "tiny.gguf", **kw)[0],
                 lambda **kw: load_llama2c(stories, **kw)):
        unrolled, scanned = load(), load(scan_layers=True)
        want = _stacked_view(_flat(nnx.state(unrolled, nnx.Param)), unrolled.config.num_layers)
        got = _flat(nnx.state(scanned, nnx.Param))
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


def _train_state(model, seed: int):
    """A TrainState whose Adam moments are non-zero (so a moment that lands in the wrong layer shows)."""
    import optax

    from jaxpref.training.step import init_state

    state = init_state(nnx.state(model, nnx.Param), optax.adam(1e-3), 0)
    rng = np.random.default_rng(seed)
    return state.replace(opt_state=jax.tree.map(
        lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype) if x.dtype == jnp.float32 else x,
        state.opt_state))


@pytest.mark.parametrize("saved_scanned", [False, True])
def test_checkpoint_restores_across_layouts(tmp_path, saved_scanned):
    unrolled, scanned = _pair_models("tiny_llama")
    source, target = (scanned, unrolled) if saved_scanned else (unrolled, scanned)
    saved = _train_state(source, seed=1)
    ck = ckpt.RunCheckpointer(tmp_path / "checkpoints", async_save=False)
    ck.save(3, saved, {"data_iterator": {}}, force=True, reference=saved.params)
    template = _train_state(random_model(target.config, seed=5), seed=2)
    restored, _, step = ck.restore(template)
    reference = ck.restore_reference(template.params, 3)
    ck.close()
    params_only, _ = ckpt.restore_params(tmp_path / "checkpoints", template.params)
    assert step == 3 and jax.tree.structure(restored) == jax.tree.structure(template)

    as_stacked = lambda tree, scanned: _flat(tree) if scanned else _stacked_view(_flat(tree), 2)
    for got, want in [(restored.params, saved.params), (reference, saved.params), (params_only, saved.params),
                      (restored.opt_state[0].mu, saved.opt_state[0].mu),
                      (restored.opt_state[0].nu, saved.opt_state[0].nu)]:
        a, b = as_stacked(got, not saved_scanned), as_stacked(want, saved_scanned)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in b)


def test_run_spec_and_export_in_both_layouts(tmp_path):
    """A scanned run loads scanned by default (model.json), unrolled on request, and exports HF tensors."""
    _, scanned = _pair_models("tiny_llama")
    run = tmp_path / "run"
    run.mkdir()
    meta = loading.model_meta(loading.LoadedModel(scanned, "preset:tiny_llama", "builtin"))
    assert meta["scan_layers"] is True and "scan_layers" not in meta["hf_config"]
    (run / "model.json").write_text(json.dumps(meta))
    ck = ckpt.RunCheckpointer(run / "checkpoints", async_save=False)
    ck.save(1, _train_state(scanned, seed=0), {}, force=True)
    ck.close()
    default = loading.load_model(f"run:{run}").model
    unrolled = loading.load_model(f"run:{run}", overrides={"scan_layers": False}).model
    assert default.config.scan_layers and not unrolled.config.scan_layers
    want = _flat(nnx.state(scanned, nnx.Param))
    got = _stacked_view(_flat(nnx.state(unrolled, nnx.Param)), 2)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    a, b = hf_tensors(default), hf_tensors(unrolled)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert "model.layers.1.mlp.down_proj.weight" in a


def test_config_field_and_cli_override():
    cfg = load_config(RunConfig, None, ["model.scan_layers=true", "model.remat=true"])
    assert cfg.model.model_overrides() == {"scan_layers": True, "remat": True, "remat_policy": "full"}
    assert "scan_layers" not in load_config(RunConfig, None, []).model.model_overrides()
    model_cfg = presets.tiny_llama(scan_layers=True)
    assert "scan_layers" not in model_cfg.to_hf_config()  # a runtime choice, like remat
    assert ModelConfig.from_hf_config(model_cfg.to_hf_config(), scan_layers=True) == model_cfg


def test_sharded_scanned_model(eight_devices, forward_results):
    """fsdp / tensor sharding of the per-layer axes after the replicated ``layers`` axis; the same log-probs
    as the unrolled model on one device."""
    models, results = forward_results
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), devices=eight_devices)
    scanned = models["tiny_qwen2", "scanned"]  # 2 kv heads: split over tensor=2; q/k/v biases
    graphdef, params, rest = nnx.split(scanned, nnx.Param, ...)
    sharded = nnx.merge(graphdef, place_params(params, mesh), rest)
    spec = lambda x: tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
    assert spec(sharded.layers.attn.query_dnh[...]) == (None, "fsdp", "tensor", None)
    assert spec(sharded.layers.attn.key_dkh[...]) == (None, "fsdp", "tensor", None)
    assert spec(sharded.layers.attn.out_nhd[...]) == (None, "tensor", None, "fsdp")
    assert spec(sharded.layers.mlp.down_fd[...]) == (None, "tensor", "fsdp")
    assert spec(sharded.layers.attn.query_bias_nh[...]) == (None, "tensor", None)
    got = _evaluate_models({"sharded": sharded}, False, *_row(128))["sharded"][0]
    want = results["tiny_qwen2", "unrolled"][0].astype(np.float64)
    assert np.all(np.abs(got - want) <= token_logp_tol(scanned.config, T, want))


def test_readme_compile_time_is_the_committed_benchmark():
    """The README's compile-time sentence is ``bench/results/compile_time_quiet.json`` formatted by
    ``bench/compile_time.py``; in that file both layouts took the same first step (float32, 32 layers of a
    width-32 model: the loss is ln 2 at step 0 and the gradient norms agree to summation-order rounding)."""
    import importlib.util
    import math
    import pathlib

    repo = pathlib.Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("compile_time_bench", repo / "bench" / "compile_time.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    payload = json.loads((repo / "bench" / "results" / "compile_time_quiet.json").read_text())
    assert bench.readme_summary(payload) in " ".join((repo / "README.md").read_text().split())
    for name in ("tiny32", "tiny32_remat"):
        steps = {r["scan_layers"]: r["first_step"] for r in payload["runs"] if r["model"] == name}
        assert set(steps) == {True, False}, name
        assert steps[True]["loss"] == pytest.approx(math.log(2), rel=1e-6)
        assert steps[True]["grad_norm"] == pytest.approx(steps[False]["grad_norm"], rel=1e-5)
