"""Held-out data and evaluation during training (issue 18): ``data.eval_split`` / ``data.eval``,
``train.eval_every``, ``checkpoint.keep_best`` and ``--data heldout:RUN_DIR``.

One tiny DPO run on the first HH pairs (a random tiny Llama saved as an HF directory, so the eval scripts
can load it as the reference) is shared by the module; everything runs in-process."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import numpy as np
import pytest

from jaxpref.config import ConfigError, RunConfig, load_config, save_config
from jaxpref.data import split as data_split
from jaxpref.data.sources import DataError
from jaxpref.models import presets, save_hf
from jaxpref.testing.models import fast_compile, random_model
from jaxpref.testing.tokenizers import make_tokenizer
from jaxpref.training import eval_during, loop

STEPS, EVERY = 4, 2
JUDGE = "jaxpref.testing.judges:length_judge"
WIN_RATE = ["train.win_rate_every=2", f"eval.judge={JUDGE}", "eval.win_rate_prompts=4", "eval.max_new_tokens=8",
            "eval.max_prompt_length=32", "eval.batch_size=4"]  # judged at steps 0 and 4
COMMON = ["data.max_length=64", "data.buckets=[64]", "train.seq_chunk=32", "train.vocab_chunk=256",
          "logging.progress=false", "optim.lr=1e-2", "checkpoint.async_save=false"]


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
    with fast_compile():
        yield


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("hf") / "tiny"
    save_hf(random_model(presets.tiny_llama(vocab_size=512), seed=0), path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hh(shared_data) -> pathlib.Path:
    return shared_data / "hh_rlhf_helpful_base_test_2k.jsonl"


def _dpo_config(run, hf_dir, hh, *extra):
    return load_config(RunConfig, None, [
        f"run_dir={run}", f"data.train={hh}", f"model.source=hf:{hf_dir}", "data.limit=40", "data.eval_split=0.2",
        f"train.eval_every={EVERY}", "train.batch_size=8", f"train.steps={STEPS}", "checkpoint.every=2",
        "checkpoint.keep=1", "checkpoint.keep_best=eval/loss", "checkpoint.keep_best_mode=max",
        "loss=[{name: sigmoid, hparams: {beta: 0.1}}]", *WIN_RATE, *COMMON, *extra])


@pytest.fixture(scope="module")
def dpo(tmp_path_factory, hf_dir, hh):
    """``(run dir, summary, eval rows by step)`` of a 4-step DPO run evaluated every 2 steps on 8 held-out pairs.
    keep_best on eval/loss in ``max`` mode: the worst loss, so that the best step is usually not the last."""
    run = tmp_path_factory.mktemp("runs") / "dpo"
    summary = loop.run_training(_dpo_config(run, hf_dir, hh), kind="preference")
    return run, summary, _eval_rows(run)


def _eval_rows(run) -> dict[int, dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    out: dict[int, dict] = {}
    for r in rows:
        if any(k.startswith("eval/") for k in r):
            assert r["step"] not in out, f"two eval rows at step {r['step']}"
            out[r["step"]] = r
    return out


def _committed(run) -> list[int]:
    from jaxpref.evaluation import run_checkpoint_steps

    return run_checkpoint_steps(run)


# ------------------------------------------------------------------------------------ the split


@dataclasses.dataclass(frozen=True)
class _Rec:
    row: int
    id: str


def test_split_is_seeded_disjoint_and_stable_on_resume(tmp_path):
    recs = [_Rec(r, f"id{r}") for r in range(3, 103)]  # source rows need not start at 0
    a = data_split.draw_split(recs, 0.1, seed=0, source="f")
    assert len(a.rows) == 10 and a == data_split.draw_split(recs, 0.1, seed=0, source="f")
    assert set(a.rows) != set(data_split.draw_split(recs, 0.1, seed=1, source="f").rows)
    train, held, split = data_split.hold_out(recs, fraction=0.1, seed=0, source="f", limit=None, run_dir=tmp_path,
                                             resume=False)
    assert split == a and {r.row for r in held} == set(a.rows) and [r.id for r in held] == list(a.ids)
    assert not {r.row for r in train} & set(a.rows) and len(train) + len(held) == len(recs)
    saved = json.loads((tmp_path / data_split.SPLIT_FILE).read_text())
    assert saved["rows"] == list(a.rows) and saved["n_eval"] == 10 and saved["n_train"] == 90
    # resume reads the recorded rows (a different record order would not change them) ...
    _, held2, _ = data_split.hold_out(recs[::-1], fraction=0.1, seed=0, source="f", limit=None, run_dir=tmp_path,
                                      resume=True)
    assert sorted(r.row for r in held2) == list(a.rows)
    # ... and refuses other settings
    with pytest.raises(DataError, match="fraction: 0.1 -> 0.2"):
        data_split.hold_out(recs, fraction=0.2, seed=0, source="f", limit=None, run_dir=tmp_path, resume=True)
    with pytest.raises(DataError, match="leaves no training records"):
        data_split.draw_split(recs[:1], 0.5, seed=0)


@pytest.mark.parametrize("override, match", [
    ("data.eval_split=1.0", r"data\.eval_split=1\.0: expected a fraction"),
    ("data.eval_split=-0.1", r"data\.eval_split=-0\.1"),
    ("train.eval_every=-1", r"train\.eval_every=-1"),
    ("checkpoint.keep_best_mode=best", r"checkpoint\.keep_best_mode='best'"),
])
def test_bad_eval_settings_are_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(RunConfig, None, [override])
    with pytest.raises(ConfigError, match="one way"):
        load_config(RunConfig, None, ["data.eval=x.jsonl", "data.eval_split=0.1"])


def test_heldout_source_needs_a_run_with_held_out_rows(tmp_path):
    from jaxpref.evaluation import load_eval_pairs

    with pytest.raises(DataError, match="not a jaxpref run directory"):
        data_split.heldout_source(f"heldout:{tmp_path}")
    save_config(RunConfig(), tmp_path / "config.yaml")
    with pytest.raises(DataError, match="held out no rows"):
        load_eval_pairs(f"heldout:{tmp_path}", make_tokenizer())


def test_held_out_rows_never_reach_training(dpo, hh, hf_dir):
    run, summary, _ = dpo
    split = json.loads((run / data_split.SPLIT_FILE).read_text())
    assert split["n_eval"] == 8 and split["n_records"] == 40 and split["seed"] == 0
    assert summary["data"]["eval"]["rows_held_out"] == 8
    assert summary["data"]["rows_kept"] + summary["data"]["eval"]["rows_kept"] <= 40
    ds = loop.load_datasets(_dpo_config(run, hf_dir, hh), make_tokenizer(), run, "preference", resume=True)
    assert not set(ds.train.row.tolist()) & set(split["rows"])
    assert set(ds.eval.row.tolist()) <= set(split["rows"])
    # what the iterator feeds the steps: positions into ds.train only
    it = loop.open_iterator(_dpo_config(run, hf_dir, hh), ds.train)
    seen = {int(r) for _ in range(STEPS) for r in next(it).index if r >= 0}
    assert seen and not seen & set(split["rows"])


# ------------------------------------------------------------------------------------ eval rows


def test_eval_rows_at_every_eval_step_with_their_own_time(dpo):
    run, summary, rows = dpo
    assert sorted(rows) == list(range(0, STEPS + 1, EVERY))
    for r in rows.values():
        assert r["eval/pairs"] == 8 and r["eval/time_s"] > 0
        for key in ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "eval/ranking_accuracy",
                    "eval/ranking_accuracy_normalized", "eval/R_star_median", "eval/alignment_gap",
                    "eval/chosen_change_mean", "eval/rejected_change_mean", "eval/fraction_chosen_displaced"):
            assert np.isfinite(r[key]), key
    assert rows[0]["eval/chosen_change_mean"] == 0 and rows[0]["eval/loss"] == pytest.approx(np.log(2), rel=1e-6)
    # the scorer and the reference's sampler compiled before step 0, the metrics and the policy's sampler at
    # the first eval: nothing after (the win rate of step 4 included)
    assert rows[0]["eval/compiles"] > 0 and "eval/win_rate" in rows[STEPS]
    assert all(rows[s]["eval/compiles"] == 0 for s in rows if s > 0), {s: r["eval/compiles"] for s, r in rows.items()}
    assert summary["eval"]["compiles"] >= rows[0]["eval/compiles"] and summary["eval_s"] > 0
    assert summary["eval"]["last"]["step"] == STEPS
    train_rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert not any("eval/loss" in r and "loss" in r for r in train_rows)  # eval rows are their own lines
    events = list((run / "tensorboard").glob("events*"))
    assert events and b"eval/ranking_accuracy" in events[0].read_bytes()


def test_eval_numbers_equal_the_eval_scripts_on_the_same_checkpoint_and_rows(dpo, hf_dir, tmp_path):
    """eval.ranking --reference (initial policy = the HF directory) and eval.win_rate against it on
    heldout:RUN; the displacement numbers from eval.ranking's per-example log-probs of model and reference."""
    from eval import ranking, win_rate

    run, _, rows = dpo
    steps = [STEPS]  # the last checkpoint (each step costs two scoring passes and plots)
    args = ["--data", f"heldout:{run}", "--max-length", "64", "--no-progress"]
    # float32 sums of ~50 log-probs of size ~5, scored by two programs (sharded params vs a restored copy)
    close = dict(rel=1e-5, abs=1e-5)
    for s in steps:
        got = ranking.main(["--model", f"run:{run}@{s}", "--reference", f"hf:{hf_dir}", "--out",
                            str(tmp_path / f"rank{s}"), *args])
        e = rows[s]
        assert got["n_pairs"] == e["eval/pairs"] == 8
        assert e["eval/ranking_accuracy"] == pytest.approx(got["ranking_accuracy"], **close)
        assert e["eval/ranking_accuracy_normalized"] == pytest.approx(got["ranking_accuracy_normalized"], **close)
        assert e["eval/R_star_median"] == pytest.approx(got["idealized"]["R_star"]["median"], **close)
        assert e["eval/R_star_normalized_median"] == pytest.approx(got["idealized"]["R_star_normalized"]["median"],
                                                                   **close)
        assert e["eval/alignment_gap"] == pytest.approx(got["alignment_gap"], **close)
        assert e["eval/alignment_gap_normalized"] == pytest.approx(got["alignment_gap_normalized"], **close)
        per = [json.loads(x) for x in (tmp_path / f"rank{s}" / "per_example.jsonl").read_text().splitlines()]
        margin = np.array([r["chosen_logp"] - r["rejected_logp"] - r["ref_chosen_logp"] + r["ref_rejected_logp"]
                           for r in per])  # DPO at beta 0.1: loss softplus(-0.1 m), reward accuracy m > 0
        assert e["eval/loss"] == pytest.approx(np.mean(np.logaddexp(0, -0.1 * margin)), rel=1e-4)
        assert e["eval/rewards/margins"] == pytest.approx(0.1 * margin.mean(), rel=1e-4, abs=1e-4)
        assert e["eval/rewards/accuracies"] == pytest.approx(np.mean(margin > 0))
    wr = win_rate.main(["--policy", f"run:{run}@{STEPS}", "--competitor", f"hf:{hf_dir}", "--judge", JUDGE,
                        "--prompts", f"heldout:{run}", "--limit", "4", "--max-new-tokens", "8", "--max-prompt-length",
                        "32", "--batch-size", "4", "--out", str(tmp_path / "wr"), "--no-progress"])
    assert wr["n_prompts"] == 4
    for key in ("win_rate", "ci_low", "ci_high"):  # the same samples and verdicts: equal up to float rounding
        assert rows[STEPS]["eval/" + key.replace("ci_", "win_rate_ci_")] == pytest.approx(wr[key], abs=1e-6), key
    assert "eval/win_rate" in rows[0] and "eval/win_rate" not in rows[2]
    # likelihood displacement since step 0 (the reference is the initial policy): what eval.displacement
    # computes from the same two scorings (mean change, share of pairs whose chosen log-prob fell)
    per = [json.loads(x) for x in (tmp_path / f"rank{STEPS}" / "per_example.jsonl").read_text().splitlines()]
    lp = np.array([[r["chosen_logp"], r["rejected_logp"]] for r in per])
    lp0 = np.array([[r["ref_chosen_logp"], r["ref_rejected_logp"]] for r in per])
    e = rows[STEPS]
    assert e["eval/chosen_logp_mean"] == pytest.approx(lp[:, 0].mean(), rel=1e-5)
    assert e["eval/rejected_logp_mean"] == pytest.approx(lp[:, 1].mean(), rel=1e-5)
    assert e["eval/chosen_change_mean"] == pytest.approx((lp - lp0)[:, 0].mean(), rel=1e-5, abs=1e-4)
    assert e["eval/rejected_change_mean"] == pytest.approx((lp - lp0)[:, 1].mean(), rel=1e-5, abs=1e-4)
    assert e["eval/fraction_chosen_displaced"] == pytest.approx(np.mean(lp[:, 0] < lp0[:, 0]))


def test_keep_best_keeps_the_best_eval_step_beside_the_last(dpo):
    run, summary, rows = dpo
    losses = {s: r["eval/loss"] for s, r in rows.items() if s > 0}
    best = max(losses, key=lambda s: (losses[s], -s))  # mode max; the first of equal values
    saved = json.loads((run / eval_during.BEST_FILE).read_text())
    assert saved["step"] == best and saved["value"] == pytest.approx(losses[best]) and saved["mode"] == "max"
    assert summary["eval"]["best_checkpoint"]["step"] == best
    assert _committed(run) == sorted({best, STEPS})  # keep=1: the last, and the best


def test_resume_keeps_split_step0_and_best(dpo, hf_dir, hh):
    run, _, rows = dpo
    split_before = (run / data_split.SPLIT_FILE).read_text()
    initial_before = (run / eval_during.INITIAL_FILE).stat().st_mtime_ns
    best_before = json.loads((run / eval_during.BEST_FILE).read_text())
    summary = loop.run_training(_dpo_config(run, hf_dir, hh, f"train.steps={STEPS + 2}"), kind="preference",
                                resume=True)
    assert summary["resumed_from"] == STEPS
    assert (run / data_split.SPLIT_FILE).read_text() == split_before
    assert (run / eval_during.INITIAL_FILE).stat().st_mtime_ns == initial_before  # step 0 read, not redone
    after = _eval_rows(run)
    assert sorted(after) == list(range(0, STEPS + 3, EVERY))
    assert all(after[s] == rows[s] for s in rows)
    new_best = best_before["step"] if best_before["value"] >= after[STEPS + 2]["eval/loss"] else STEPS + 2
    assert json.loads((run / eval_during.BEST_FILE).read_text())["step"] == new_best
    assert _committed(run) == sorted({new_best, STEPS + 2})


# ------------------------------------------------------------------------------------ units


def test_best_checkpoint_modes_and_stale_records(tmp_path):
    b = eval_during.BestCheckpoint(tmp_path, "loss")
    assert b.metric == "eval/loss" and b.mode == "min"
    assert eval_during.best_mode("eval/ranking_accuracy") == "max"
    assert eval_during.best_mode("eval/alignment_gap") == "min"
    assert b.improves({"eval/loss": 2.0})
    b.update(4, {"eval/loss": 2.0})
    assert not b.improves({"eval/loss": 2.0}) and b.improves({"eval/loss": 1.0})
    assert not b.improves({"eval/loss": float("nan")})
    with pytest.raises(ValueError, match="not an eval metric .*eval/loss"):
        b.improves({"eval/lss": 1.0, "eval/loss2": 1.0})
    # a resumed run keeps a best step it restarts at or after, if that checkpoint was committed
    assert eval_during.BestCheckpoint(tmp_path, "eval/loss", start=6, committed=[4, 6]).step == 4
    assert eval_during.BestCheckpoint(tmp_path, "eval/loss", start=2, committed=[2, 4]).step is None
    assert eval_during.BestCheckpoint(tmp_path, "eval/loss", start=6, committed=[6]).step is None


def test_prune_keeps_last_n_and_best(tmp_path):
    import jax.numpy as jnp

    from jaxpref.training.checkpoint import RunCheckpointer

    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class S:
        params: dict
        step: jax.Array

        def replace(self, **kw):
            return dataclasses.replace(self, **kw)

    ck = RunCheckpointer(tmp_path / "ck", every=1, keep=2, async_save=False, keep_best=True)
    for s in range(1, 7):
        ck.save(s, S({"w": jnp.full(2, float(s))}, jnp.asarray(s)), {})
        ck.prune(best=2)
    assert ck.all_steps() == [2, 5, 6]
    ck.close()


def test_wro_prompt_split_and_evaluator_batches(tmp_path):
    from jaxpref.training.wro import PromptBatch, PromptTable

    n = 10
    table = PromptTable([np.array([i + 1], np.int32) for i in range(n)], [f"p{i}" for i in range(n)],
                        np.arange(100, 100 + n, dtype=np.int64), [[np.array([7], np.int32)] for _ in range(n)], 0)
    train, held = eval_during.split_prompts(table, fraction=0.3, seed=0, source="prompts.txt", limit=None,
                                            run_dir=tmp_path, resume=False)
    assert len(train) == 7 and len(held) == 3 and not set(train.rows) & set(held.rows)
    assert set(train.rows) | set(held.rows) == set(table.rows)
    assert [held.prompts[i] for i in range(3)] == [f"p{r - 100}" for r in held.rows]

    class FakeCollector:  # win rate of a batch = mean of its rows' values; records the sampling keys
        def __init__(self, table):
            self.table, self.keys = table, []

        def collect(self, batch, policy, reference):
            self.keys.append(batch.step)
            v = np.asarray(batch.index, float) / 1000 * policy
            return None, {"judge/win_rate": v.mean(), "judge/value": v.mean(), "response_length": 1.0}

    col = FakeCollector(held)
    ev = eval_during.WROEvaluator(col, 2, lambda p: p, None, lambda pos, k: PromptBatch(pos, held.rows[pos], k))
    out = ev(4, type("St", (), {"params": 1.0})())
    rows = held.rows.astype(float) / 1000
    expected = np.mean([rows[[0, 1]].mean(), rows[[2, 0]].mean()])  # the last batch tops up with the first prompt
    assert out["eval/judge/win_rate"] == pytest.approx(expected) and out["eval/prompts"] == 3
    ev(6, type("St", (), {"params": 1.0})())
    assert col.keys == [ev.KEY_OFFSET, ev.KEY_OFFSET + 1] * 2  # the same sampling keys at every eval


# ------------------------------------------------------------------------------------ SFT and reward models


def _right_padded(seqs) -> tuple[np.ndarray, np.ndarray]:
    """[N, T] ids and segment ids (1 on real tokens): causal attention, so padding after a sequence changes
    nothing before it."""
    t = max(map(len, seqs))
    ids, seg = np.zeros((len(seqs), t), np.int32), np.zeros((len(seqs), t), np.int32)
    for i, x in enumerate(seqs):
        ids[i, :len(x)], seg[i, :len(x)] = x, 1
    return ids, seg


def _rewards(model, seqs) -> np.ndarray:
    ids, seg = _right_padded(seqs)
    return np.asarray(model(ids, segment_ids=seg), np.float64)


def _nll_and_tokens(model, prompts, responses) -> tuple[float, int]:
    """Summed NLL of the responses after their prompts from the full logits, in float64 (no chunking)."""
    seqs = [np.concatenate([p, r]) for p, r in zip(prompts, responses)]
    ids, seg = _right_padded(seqs)
    hidden = np.asarray(model(ids, segment_ids=seg).hidden, np.float64)  # [N, T, D]
    matrix, layout = model.unembedding()
    matrix = np.asarray(matrix, np.float64)
    logits = hidden @ (matrix if layout == "dv" else matrix.T)  # [N, T, V]
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    nll = -sum(logp[i, t - 1, ids[i, t]] for i, p in enumerate(prompts) for t in range(len(p), len(seqs[i])))
    return float(nll), sum(map(len, responses))


@pytest.fixture(scope="module")
def held_records(hh):
    from jaxpref.data.formats import load_preferences

    return load_preferences(hh).records[:5]


def test_sft_evaluator_is_the_held_out_token_mean_nll(hf_dir, held_records):
    """train.sft's evaluator (padded buckets, chunked log-probs) against float64 log-softmax of full logits."""
    from types import SimpleNamespace

    from flax import nnx

    from jaxpref.data.tokenize import TokenizeConfig, tokenize_sft
    from jaxpref.loading import load_model

    model = load_model(f"hf:{hf_dir}").model
    ex = tokenize_sft(held_records, make_tokenizer(), TokenizeConfig(max_length=64))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ev = eval_during.SFTEvaluator(ex, graphdef, rest, batch_size=4, buckets=(64,),
                                  chunks={"seq_chunk": 32, "vocab_chunk": 256})
    out = ev(0, SimpleNamespace(params=params))
    nll, tokens = _nll_and_tokens(model, ex.prompt, ex.response)
    assert out["eval/examples"] == len(ex) == 5
    assert out["eval/loss"] == pytest.approx(nll / tokens, rel=1e-5)  # float32 sums of ~250 log-probs
    assert out["eval/perplexity"] == pytest.approx(np.exp(nll / tokens), rel=1e-4)


def test_reward_evaluator_is_the_bradley_terry_loss_of_held_out_pairs(hf_dir, held_records):
    """train.reward_model's evaluator (batched, padded) against rewards of each sequence scored unpadded."""
    from types import SimpleNamespace

    from flax import nnx

    from jaxpref.data.tokenize import TokenizeConfig, tokenize_pairs
    from jaxpref.loading import load_model
    from jaxpref.reward_model import RewardModel, score_reward_pairs

    rm = RewardModel(load_model(f"hf:{hf_dir}").model, seed=3)
    pairs = tokenize_pairs(held_records, make_tokenizer(), TokenizeConfig(max_length=64))
    graphdef, params, rest = nnx.split(rm, nnx.Param, ...)
    ev = eval_during.RewardEvaluator(lambda p: score_reward_pairs(nnx.merge(graphdef, p, rest), pairs, batch_size=4,
                                                                  buckets=(64,)), len(pairs))
    out = ev(0, SimpleNamespace(params=params))
    m = (_rewards(rm, [np.concatenate([p, c]) for p, c in zip(pairs.prompt, pairs.chosen)])
         - _rewards(rm, [np.concatenate([p, j]) for p, j in zip(pairs.prompt, pairs.rejected)]))
    assert out["eval/pairs"] == len(pairs) == 5
    assert out["eval/loss"] == pytest.approx(np.mean(np.logaddexp(0, -m)), rel=1e-5, abs=1e-6)
    assert out["eval/accuracy"] == pytest.approx(np.mean(m > 0))
    assert out["eval/rewards/margins"] == pytest.approx(m.mean(), rel=1e-4, abs=1e-5)
