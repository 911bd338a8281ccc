"""Bradley-Terry reward model: exact gradient accumulation, 2-step training run, loading as a judge."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpref import reward_model
from jaxpref.evaluation import load_judge
from jaxpref.loading import SpecError
from jaxpref.models import presets, save_hf
from jaxpref.testing.models import fast_compile, random_model
from jaxpref.testing.tokenizers import make_tokenizer
from jaxpref.testing.tolerances import assert_same_sgd_step, gamma, relative_tol, transformer_chain_length
from jaxpref.training import step as steplib
from jaxpref.types import PairBatch


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
    with fast_compile():
        yield


def _batch(b=4, t=12, vocab=128, seed=0) -> PairBatch:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (b, 2, t)).astype(np.int32)
    lengths = rng.integers(6, t + 1, (b, 2))
    seg = (np.arange(t)[None, None] < lengths[..., None]).astype(np.int32)
    mask = seg * (np.arange(t)[None, None] >= 4)
    example = np.array([True] * (b - 1) + [False])  # one padding row
    return PairBatch(input_ids=ids, loss_mask=mask.astype(np.int32), segment_ids=seg,
                     positions=np.where(seg > 0, np.arange(t), 0).astype(np.int32), example_mask=example,
                     votes=np.ones(b, np.float32), index=np.arange(b, dtype=np.int32))


def test_bt_loss_and_micro_batches_equal_full_batch():
    rm = reward_model.RewardModel(random_model(presets.tiny_llama(), seed=1), seed=0)
    graphdef, params, rest = steplib.split_model(rm)
    batch = _batch()
    r = np.asarray(reward_model.pair_rewards(graphdef, params, rest, batch))
    loss, m = reward_model.bt_metrics(jnp.asarray(r), jnp.asarray(batch.example_mask))
    margin = (r[:, 0] - r[:, 1])[:3]
    # same rewards, float32 vs float64 BT loss: softplus (2 ops + exp's error) then a mean of 3 positive terms
    assert float(loss) == pytest.approx(np.mean(np.log1p(np.exp(-margin))), rel=relative_tol(3 + 3 + 1))
    # an exact count over 3, one correctly rounded float32 division
    assert float(m["accuracy"]) == np.float32(np.sum(margin > 0)) / np.float32(3)
    opt = optax.sgd(0.1)
    results = []
    for k in (1, 2):
        state = steplib.init_state(params, opt, 0)
        step = jax.jit(reward_model.make_reward_step(graphdef, rest, opt, micro_batches=k))
        new, metrics = step(state, batch)
        results.append((new.params, metrics))
    (p1, m1), (p2, m2) = results
    # Two programs (the step, micro-batched or not, vs the forward above) over the same rows. A reward
    # r = h·w (h: final-norm output, |h| <= √D·max|norm scale|) is within ρ·‖h‖‖w‖ between them, ρ = 2γ of the
    # row's rounding chain to the hidden state plus the head's D; the loss (slope |σ| <= 1 per reward of a
    # pair) within 2ρ·‖h‖‖w‖ plus its mean's rounding; gradients as in tolerances.dpo_step_bounds.
    cfg, t, n = rm.config, batch.input_ids.shape[-1], 3
    rho = relative_tol(transformer_chain_length(cfg, t) - cfg.vocab_size + cfg.hidden_size + n)
    h_norm = np.sqrt(cfg.hidden_size) * float(np.abs(np.asarray(rm.backbone.final_norm.scale_d[...])).max())
    d_r = rho * h_norm * float(np.linalg.norm(np.asarray(rm.score_d[...])))
    loss_bound = 2 * d_r + relative_tol(n + 4) * float(loss)
    assert abs(float(m1["loss"]) - float(loss)) <= loss_bound
    assert abs(float(m2["loss"]) - float(m1["loss"])) <= loss_bound
    if np.all(np.abs(margin) > 2 * d_r):  # no margin within rounding of 0: the ranking is the same
        assert float(m2["accuracy"]) == float(m1["accuracy"])
    jac = jax.jit(jax.jacrev(lambda w: reward_model.pair_rewards(graphdef, w, rest, batch)))(params)
    rows = np.linalg.norm(np.concatenate([np.asarray(x).reshape(*r.shape, -1) for x in jax.tree.leaves(jac)], -1),
                          axis=-1)[:n]  # [3, 2] ‖∇r‖ of the valid rows
    coef = 1.0 / n + 0.25 * 2 * d_r / n  # |∂L/∂r| <= 1/n, and σ's own error (slope 1/4) from δm <= 2δr
    g_chain = transformer_chain_length(cfg, t, backward=True, tokens=r.size * t)
    assert_same_sgd_step(p1, m1, p2, m2, {"gradient": relative_tol(g_chain) * coef * float(rows.sum())}, lr=0.1)


def test_train_two_steps_and_judge(tmp_path, shared_data):
    from train.reward_model import main

    hf = tmp_path / "hf"
    backbone = random_model(presets.tiny_llama(vocab_size=512), seed=0)
    backbone.final_norm.scale_d[...] = 0.0  # every step-1 reward is exactly the head's bias (0)
    save_hf(backbone, hf)
    make_tokenizer().save_pretrained(hf)
    run = tmp_path / "rm"
    main([f"run_dir={run}", f"data.train={shared_data / 'hh_rlhf_helpful_base_test_2k.jsonl'}",
          f"model.source=hf:{hf}", "data.limit=16", "data.max_length=64", "data.buckets=[64]", "train.batch_size=8",
          "train.steps=2", "optim.lr=1e-3", "logging.progress=false", "logging.tensorboard=false"])
    for name in ("config.yaml", "metrics.jsonl", "model.json", "summary.json"):
        assert (run / name).is_file(), name
    assert json.loads((run / "model.json").read_text())["reward_model"]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert {"loss", "accuracy", "rewards/chosen", "rewards/rejected", "rewards/margins"} <= set(rows[0])
    # step 1 (the initial weights): margins are exactly 0, so the BT loss is softplus(0) = ln 2 up to float32
    # rounding: softplus (log1p∘exp, 2 ops + 1 for exp's error) then a mean of n <= 8 equal terms: 2γ_{8+3}·ln 2
    first = rows[0]
    assert first["rewards/margins"] == first["rewards/chosen"] == first["rewards/rejected"] == 0.0
    assert first["accuracy"] == 0.0  # a zero margin is not a correct ranking
    assert first["loss"] == pytest.approx(math.log(2.0), abs=2 * gamma(8 + 3) * math.log(2.0))
    # step 2: the mean BT loss is convex in the margins, so Jensen bounds it below by the loss of the mean margin
    second = rows[1]
    assert second["loss"] >= math.log1p(math.exp(-second["rewards/margins"])) - 2 * gamma(8 + 3) * second["loss"]

    judge = load_judge(f"rm:{run}")
    prompts = ["\n\nHuman: hi\n\nAssistant:"] * 3
    a, b = [" Hello there!", " no", " same"], [" no", " Hello there!", " same"]
    p = judge(prompts, a, b)
    assert np.all((p > 0) & (p < 1))
    assert p[0] + p[1] == pytest.approx(1.0, abs=1e-6)  # swapping the responses gives 1 - p
    assert p[2] == 0.5  # identical responses are rejected by the tokeniser -> a tie
    policy_run = tmp_path / "policy_run"
    policy_run.mkdir()
    (policy_run / "model.json").write_text(json.dumps({"hf_config": {}, "tokenizer": None}))
    with pytest.raises(SpecError, match="not a reward-model run"):
        load_judge(f"rm:{policy_run}")


def test_lora_reward_model_trains_adapters_and_head_and_loads_as_a_judge(tmp_path, shared_data):
    """A LoRA reward model checkpoints only the adapters and the head; ``rm:`` rebuilds the backbone from the
    record and restores them: the judge's rewards of the held-out pairs give the last step's logged eval/loss."""
    import orbax.checkpoint as ocp

    from jaxpref.data.formats import format_config, load_preferences
    from train.reward_model import main

    pairs = tmp_path / "hh8.jsonl"
    with (shared_data / "hh_rlhf_helpful_base_test_2k.jsonl").open() as f:
        pairs.write_text("".join(next(f) for _ in range(8)))
    run = tmp_path / "rm"
    main([f"run_dir={run}", f"data.train={pairs}", f"data.eval={pairs}", "model.source=preset:tiny_llama",
          "model.tokenizer=builtin", "model.overrides={vocab_size: 512}", "data.max_length=32", "data.buckets=[32]",
          "train.batch_size=8", "train.steps=2", "optim.lr=1e-2", "lora={rank: 4, alpha: 8, dropout: 0.1}",
          "logging.progress=false", "logging.tensorboard=false", "checkpoint.async_save=false"])
    tree = ocp.StandardCheckpointHandler().metadata(run / "checkpoints" / "2" / "params").tree
    keys = [[str(getattr(k, "key", k)) for k in p] for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    names = {k[-2] if k[-1] == "value" else k[-1] for k in keys}
    assert names and all(n.endswith(("_lora_a", "_lora_b")) or n in ("score_d", "score_bias") for n in names)
    assert {"score_d", "score_bias"} <= names
    last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "eval/loss" in x][-1]
    judge = load_judge(f"rm:{run}")
    records = load_preferences(str(pairs), format_config(None)).records
    r = judge.rewards([x.prompt for x in records], [x.chosen for x in records], [x.rejected for x in records])
    margin = r[:, 0].astype(np.float64) - r[:, 1]
    assert last["step"] == 2 and np.all(np.isfinite(margin))
    assert float(np.mean(np.logaddexp(0.0, -margin))) == pytest.approx(last["eval/loss"], rel=1e-5)
