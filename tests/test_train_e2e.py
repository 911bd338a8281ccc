"""End to end on real data: SFT then DPO on HH-RLHF, run-directory contents, rejects,
precomputed reference reuse and ``run:`` spec overrides. SIGKILL -> --resume (sync and async
checkpoint writes) is in ``test_reliability.py``."""

import json

import jax
import numpy as np
import pytest

from jaxpref.config import RunConfig, load_config
from jaxpref.models import presets
from jaxpref.testing.tolerances import U_BF16, dpo_ln2_tol, relative_tol, transformer_chain_length
from jaxpref.training.loop import RunError, run_training

COMMON = [
    "model.source=preset:tiny_llama", "model.tokenizer=builtin", "model.overrides={vocab_size: 512}",
    "data.limit=16", "data.max_length=128", "data.buckets=[128]", "train.batch_size=8",
    "logging.progress=false", "logging.tensorboard=true", "train.seq_chunk=32", "train.vocab_chunk=256",
]


TINY = presets.tiny_llama(vocab_size=512)  # the model COMMON builds


def _ln2_tol(m):
    """|step-0 DPO loss − ln 2| bound for a metrics row (batch 8, rows of 128, β = 0.1; tolerances.py)."""
    return dpo_ln2_tol(TINY, 128, m["logps/chosen"], m["logps/rejected"], beta=0.1, n_pairs=8)


def cfg_for(tmp, name, hh, *extra):
    return load_config(RunConfig, None, [f"run_dir={tmp / name}", f"data.train={hh}", *COMMON, *extra])


@pytest.fixture(scope="module")
def hh(shared_data):
    return shared_data / "hh_rlhf_helpful_base_test_2k.jsonl"


@pytest.fixture(scope="module")
def sft_then_dpo(tmp_path_factory, hh):
    tmp = tmp_path_factory.mktemp("e2e")
    sft = run_training(cfg_for(tmp, "sft", hh, "train.steps=6", "optim.lr=3e-3", "checkpoint.every=3"), kind="sft")
    dpo = run_training(cfg_for(tmp, "dpo", hh, f"model.source=run:{tmp / 'sft'}", "train.steps=6",
                               "optim.lr=1e-3", "train.micro_batches=2", "checkpoint.every=3",
                               "loss=[{name: sigmoid, hparams: {beta: 0.1}}]"), kind="preference")
    return tmp, sft, dpo


def _metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sft_then_dpo_losses_fall(sft_then_dpo):
    tmp, sft, dpo = sft_then_dpo
    m_sft = _metrics(tmp / "sft")
    assert [m["step"] for m in m_sft] == list(range(1, 7))
    assert m_sft[-1]["loss"] < m_sft[0]["loss"] - 0.2
    m_dpo = _metrics(tmp / "dpo")
    assert m_dpo[0]["loss"] == pytest.approx(np.log(2), abs=_ln2_tol(m_dpo[0]))  # policy == reference at step 0
    assert min(m["loss"] for m in m_dpo[2:]) < m_dpo[0]["loss"] - 0.01
    assert m_dpo[-1]["rewards/accuracies"] >= 0.5


def test_run_directory_has_everything(sft_then_dpo):
    tmp, _, dpo = sft_then_dpo
    run = tmp / "dpo"
    for name in ("config.yaml", "metrics.jsonl", "model.json", "rejects.jsonl", "summary.json", "run.log"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3, 6]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["final_metrics"]["step"] == 6
    # time to the first step and the loop's compilations (loaded from the run-wide test cache, or compiled)
    assert 0 < summary["time_to_first_step_s"] <= summary["seconds"]
    assert summary["compiles"] + summary["cache_loads"] >= 1 and 0 < summary["compile_s"] < summary["seconds"]
    assert summary["steady_tokens_per_s"] >= summary["tokens_per_s"]
    assert load_config(RunConfig, run / "config.yaml").train.micro_batches == 2  # resolved config reloads


def test_rejects_report_known_bad_rows(sft_then_dpo):
    tmp, _, dpo = sft_then_dpo
    rejects = [json.loads(x) for x in (tmp / "dpo" / "rejects.jsonl").read_text().splitlines()]
    by_row = {r["row"]: r["reason"] for r in rejects}
    assert {120, 740, 1214, 721} <= set(by_row)
    assert by_row[721] == "identical"
    assert {by_row[r] for r in (120, 740, 1214)} == {"whitespace_only"}
    assert dpo["data"]["rows_rejected"] == len(rejects)


def test_precomputed_reference_matches_live_and_is_reused(sft_then_dpo, hh, caplog):
    tmp, _, _ = sft_then_dpo
    extra = [f"model.source=run:{tmp / 'sft'}", "train.steps=2", "reference.strategy=precomputed",
             f"reference.cache_dir={tmp / 'refcache'}", "reference.batch_size=8", "checkpoint.every=0",
             "loss=[{name: sigmoid}]"]
    first = run_training(cfg_for(tmp, "pre1", hh, *extra), kind="preference")
    second = run_training(cfg_for(tmp, "pre2", hh, *extra), kind="preference")
    assert first["reference_logps"]["computed"] is True
    assert second["reference_logps"]["computed"] is False  # loaded from the cache, no recomputation
    assert second["reference_logps"]["cache"] == first["reference_logps"]["cache"]
    # The cached values equal a live forward of the reference (the SFT policy).
    live = _metrics(tmp / "dpo")[0]
    pre = _metrics(tmp / "pre1")[0]
    assert pre["loss"] == pytest.approx(np.log(2), abs=_ln2_tol(pre))
    cached = np.load(first["reference_logps"]["cache"])["logps"]
    from jaxpref import loading
    from jaxpref.data.batching import pair_batch
    from jaxpref.training import loop
    from jaxpref.training import step as S

    cfg = cfg_for(tmp, "pre1", hh, *extra)
    loaded = loading.load_model(f"run:{tmp / 'sft'}")
    tok = loading.load_tokenizer(loaded.tokenizer_spec)
    (tmp / "scratch").mkdir()
    data, _ = loop.load_data(cfg, tok, tmp / "scratch", "preference")
    gd, params, rest = S.split_model(loaded.model)
    batch = pair_batch(data, list(range(len(data))), buckets=(128,))
    live_logps = np.asarray(jax.jit(lambda p, b: S.pair_logps(gd, p, rest, b, seq_chunk=32, vocab_chunk=256)[0])(
        params, batch))
    # two programs, same sums of negative token log-probs: 2γ of one row's rounding chain (tolerances.py)
    np.testing.assert_allclose(cached, live_logps, rtol=relative_tol(transformer_chain_length(TINY, 128)), atol=0)
    assert live["logps/chosen"] != 0


def test_config_errors_are_clear(tmp_path, hh):
    with pytest.raises(RunError, match="need reference log-probs"):
        run_training(cfg_for(tmp_path, "x", hh, "reference.strategy=none", "loss=[{name: sigmoid}]"))
    with pytest.raises(RunError, match="does not take hyperparameter"):
        run_training(cfg_for(tmp_path, "y", hh, "loss=[{name: sigmoid, hparams: {tau: 1.0}}]"))


def test_run_spec_takes_runtime_overrides_and_refuses_architecture_changes(sft_then_dpo):
    """``run:`` specs honour dtype / param_dtype / remat (they were silently ignored once) and refuse to
    change the saved architecture; overrides equal to the saved values are accepted."""
    from flax import nnx

    from jaxpref.loading import SpecError, load_model

    tmp, _, _ = sft_then_dpo
    base = load_model(f"run:{tmp / 'sft'}").model
    bf = load_model(f"run:{tmp / 'sft'}", dtype="bfloat16", param_dtype="bfloat16",
                    overrides={"remat": True, "remat_policy": "dots", "vocab_size": 512}).model
    assert (bf.config.dtype, bf.config.param_dtype, bf.config.remat, bf.config.remat_policy) == \
        ("bfloat16", "bfloat16", True, "dots")
    p32 = jax.tree.leaves(nnx.split(base, nnx.Param, ...)[1])
    p16 = jax.tree.leaves(nnx.split(bf, nnx.Param, ...)[1])
    assert all(x.dtype == jax.numpy.bfloat16 for x in p16)
    for a, b in zip(p32, p16, strict=True):
        np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a), rtol=U_BF16, atol=0)  # one rounding
    with pytest.raises(SpecError, match=r"vocab_size=1024 \(saved: 512\)"):
        load_model(f"run:{tmp / 'sft'}", overrides={"vocab_size": 1024})
