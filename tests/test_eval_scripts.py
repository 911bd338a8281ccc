"""The ``eval.*`` scripts end to end on tiny models: an HF directory (random tiny Llama + offline tokenizer
saved next to it) and a 2-step DPO run started from it, on the first pairs of the shared HH and PandaLM
files. Scripts are called in-process (``main(argv)``) so compilations are shared."""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import pytest

from jaxpref.config import RunConfig, load_config
from jaxpref.models import presets, save_hf
from jaxpref.testing.models import fast_compile, random_model
from jaxpref.testing.tokenizers import make_tokenizer
from jaxpref.training.loop import run_training

DATA = ["--limit", "16", "--max-length", "64", "--batch-size", "8", "--no-progress"]


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
def hh(shared_data):
    return shared_data / "hh_rlhf_helpful_base_test_2k.jsonl"


@pytest.fixture(scope="module")
def pandalm(shared_data):
    return shared_data / "pandalm_testset_v1_multiannotator.jsonl"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, hf_dir, hh) -> pathlib.Path:
    run = tmp_path_factory.mktemp("runs") / "dpo"
    cfg = load_config(RunConfig, None, [
        f"run_dir={run}", f"data.train={hh}", f"model.source=hf:{hf_dir}", "data.limit=16", "data.max_length=64",
        "data.buckets=[64]", "train.batch_size=8", "train.steps=2", "checkpoint.every=1", "optim.lr=1e-2",
        "logging.progress=false", "logging.tensorboard=false", "train.seq_chunk=32", "train.vocab_chunk=256",
        "loss=[{name: sigmoid, hparams: {beta: 0.1}}]"])
    run_training(cfg, kind="preference")
    return run


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("eval_out")


def _jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_ranking_on_hf_directory_without_reference_reports_r_only(hf_dir, hh, out, capsys):
    from eval import ranking

    summary = ranking.main(["--model", f"hf:{hf_dir}", "--data", str(hh), "--out", str(out / "rank_hf"), *DATA])
    saved = json.loads((out / "rank_hf" / "ranking.json").read_text())
    assert saved["n_pairs"] == 16 and saved["ranking_accuracy"] == pytest.approx(summary["ranking_accuracy"])
    assert "ranking_accuracy_normalized" in saved and saved["reference"] is None
    # R* and the gap are functions of a reference model (Chen Cor. 3.3): none without --reference, and why.
    for key in ("idealized", "alignment_gap", "alignment_gap_normalized", "difficulty", "flip_categories"):
        assert key not in saved, key
    assert "--reference" in saved["needs_reference"]
    assert "--reference" in capsys.readouterr().out
    rows = _jsonl(out / "rank_hf" / "per_example.jsonl")
    assert len(rows) == 16 and "idealized_correct" not in rows[0] and "flip_threshold" not in rows[0]
    assert np.mean([r["chosen_logp"] >= r["rejected_logp"] for r in rows]) == pytest.approx(saved["ranking_accuracy"])
    assert (out / "rank_hf" / "margins.png").stat().st_size > 0
    assert not (out / "rank_hf" / "idealized.png").exists()
    scoring = saved["scoring"]["model"]  # compile accounting and throughput, from the packed scorer
    assert scoring["layout"] == "packed" and len(scoring["shapes"]) <= 2
    assert scoring["real_tokens"] > sum(r["chosen_tokens"] + r["rejected_tokens"] for r in rows)  # + prompts
    assert 0 < scoring["real_token_fraction"] <= 1 and scoring["compile_s"] <= scoring["wall_s"]


def test_ranking_on_run_checkpoint_with_votes_and_reference(run_dir, hf_dir, pandalm, out):
    from eval import ranking

    summary = ranking.main(["--model", f"run:{run_dir}", "--reference", f"hf:{hf_dir}", "--data", str(pandalm),
                            "--out", str(out / "rank_run"), *DATA])
    assert summary["idealized"]["alpha_source"] == "votes" and "needs_reference" not in summary
    assert set(summary["scoring"]) == {"model", "reference"}
    assert set(summary["idealized"]["R_star"]) == {"min", "median", "max"}
    assert summary["idealized"]["betas"] == [0.01, 0.1, 1.0, 5.0, 10.0]
    assert summary["alignment_gap"] == pytest.approx(100 * (summary["idealized"]["R_star"]["median"]
                                                            - summary["ranking_accuracy"]), abs=1e-4)
    for png in ("margins.png", "idealized.png", "flip_threshold.png"):
        assert (out / "rank_run" / png).stat().st_size > 0
    assert summary["n_evaluated"] == summary["n_pairs"] - summary["n_ties"]
    fc = summary["flip_categories"]
    assert sum(v["count"] for v in fc.values()) == summary["n_evaluated"]
    rows = _jsonl(out / "rank_run" / "per_example.jsonl")
    assert all(0.5 <= r["alpha"] <= 1.0 for r in rows) and "ref_chosen_logp" in rows[0]
    # c (difficulty) comes from the reference, R from the model.
    for r in rows:
        assert r["reference_log_ratio"] == pytest.approx(r["ref_rejected_logp"] - r["ref_chosen_logp"], abs=1e-3)
    ev = [r for r in rows if r["evaluated"]]
    assert np.mean([r["correct"] for r in ev]) == pytest.approx(summary["ranking_accuracy"])


def test_ches_on_hf_directory_and_filtering(hf_dir, hh, out):
    from eval import ches

    summary = ches.main(["--model", f"hf:{hf_dir}", "--data", str(hh), "--out", str(out / "ches_hf"),
                         "--keep-lowest", "0.25", "--window", "4", *DATA])
    rows = _jsonl(out / "ches_hf" / "ches.jsonl")
    assert len(rows) == 16 and set(rows[0]) >= {"id", "ches", "ln_ches", "last_hidden_ip", "edit_distance"}
    assert all(0.0 <= r["edit_distance"] <= 1.0 for r in rows)
    kept = _jsonl(out / "ches_hf" / "filtered.jsonl")
    assert len(kept) == math.ceil(0.25 * 16) and {"chosen", "rejected"} <= set(kept[0])  # source rows, trainable
    cut = summary["filtered"]["max_ln_ches_kept"]
    kept_ids = set(summary["filtered"]["ids"])
    assert all((r["ln_ches"] <= cut) == (r["id"] in kept_ids) for r in rows)
    assert len(summary["windows"]["by_quantile"]["0.5"]) == 4
    assert (out / "ches_hf" / "ches.png").stat().st_size > 0
    assert json.loads((out / "ches_hf" / "summary.json").read_text())["n_pairs"] == 16
    assert summary["scoring"]["layout"] == "padded"  # hidden-state sums need the [2B, T] layout


def test_ches_on_run_checkpoint(run_dir, pandalm, out):
    from eval import ches

    summary = ches.main(["--model", f"run:{run_dir}@1", "--data", str(pandalm), "--out", str(out / "ches_run"),
                         *DATA])
    assert summary["n_pairs"] == len(_jsonl(out / "ches_run" / "ches.jsonl")) > 0


def test_displacement_over_checkpoints(run_dir, out):
    from eval import displacement

    summary = displacement.main(["--run", str(run_dir), "--out", str(out / "disp"), "--no-progress"])
    assert summary["steps"] == [0, 1, 2] and summary["n_pairs"] == 16 and summary["beta"] == 0.1
    assert set(summary["scoring"]) == {"0", "1", "2"}
    first = summary["per_step"][0]
    assert first["dpo_loss_mean"] == pytest.approx(math.log(2), abs=1e-5)  # step 0 is the reference
    assert first["chosen_change_mean"] == 0.0 and first["flip_categories"]["correct->incorrect"] == 0.0
    for step in summary["per_step"]:
        assert sum(step["flip_categories"].values()) == pytest.approx(1.0)
    rows = _jsonl(out / "disp" / "per_example.jsonl")
    assert len(rows) == 16 and set(rows[0]["chosen_logp"]) == {"0", "1", "2"}
    last = summary["per_step"][-1]
    assert last["chosen_change_mean"] == pytest.approx(np.mean([r["chosen_logp"]["2"] - r["chosen_logp"]["0"]
                                                                for r in rows]), abs=1e-3)
    assert isinstance(summary["likelihood_displacement"], bool)
    assert (out / "disp" / "logps.png").is_file() and (out / "disp" / "flip_categories.png").is_file()


def test_win_rate_with_callable_judge(run_dir, hf_dir, hh, out):
    from eval import win_rate

    summary = win_rate.main(["--policy", f"run:{run_dir}", "--competitor", f"hf:{hf_dir}",
                             "--judge", "jaxpref.testing.judges:length_judge", "--prompts", str(hh),
                             "--limit", "6", "--max-new-tokens", "8", "--max-prompt-length", "48",
                             "--batch-size", "4", "--out", str(out / "wr"), "--no-progress"])
    saved = json.loads((out / "wr" / "win_rate.json").read_text())
    assert {"win_rate", "ci_low", "ci_high", "n", "tie_rule"} <= set(saved) and saved["n"] == 6
    assert saved["tie_rule"] == "half" and saved["ci_low"] <= saved["win_rate"] <= saved["ci_high"]
    samples = _jsonl(out / "wr" / "samples.jsonl")
    assert len(samples) == 6
    # The judge saw (first, second); p_policy maps it back, and it is the length preference of the pair.
    for s in samples:
        a, b = s["policy_response"], s["competitor_response"]
        assert s["p_policy"] == pytest.approx(1 / (1 + math.exp(-(len(a) - len(b)) / 10)), abs=1e-9)
    assert summary["win_rate"] == pytest.approx(np.mean([s["p_policy"] for s in samples]))


def test_load_judge_from_file(tmp_path):
    from jaxpref.evaluation import SpecError, load_judge

    f = tmp_path / "my_judge.py"
    f.write_text("def judge(p, a, b):\n    return [0.25] * len(a)\n")
    np.testing.assert_allclose(load_judge(f"{f}:judge")(["x"], ["a"], ["b"]), [0.25])
    with pytest.raises(SpecError):
        load_judge("jaxpref.testing.judges:nope")


def test_report_collects_curves_and_results(run_dir, out):
    from eval import report

    (out / "extra").mkdir(exist_ok=True)
    (out / "extra" / "win_rate.json").write_text(json.dumps({"win_rate": 0.5, "n": 3}))
    md = report.main(["--run", str(run_dir), "--eval-dir", str(out / "extra")])
    text = md.read_text()
    assert "curves_loss.png" in text and "summary.json" in text and "win_rate.json" in text
    assert (md.parent / "curves_loss.png").is_file() and (md.parent / "report.html").is_file()


def test_score_pairs_sharded_on_a_mesh_matches_single_device(hf_dir, hh):
    from jaxpref import evaluation as ev
    from jaxpref.loading import load_model
    from jaxpref.parallel import MeshConfig, make_mesh
    from jaxpref.testing import tolerances as tol

    mesh = make_mesh(MeshConfig(data=-1))  # 8 fake CPU devices (conftest)
    loaded, tok = ev.load_model_and_tokenizer(f"hf:{hf_dir}")
    data = ev.load_eval_pairs(hh, tok, limit=6, tokenize=ev.TokenizeConfig(max_length=64))
    plain = ev.score_pairs(loaded.model, data.pairs, batch_size=4, with_hidden=True, progress=False)
    sharded = ev.score_pairs(load_model(f"hf:{hf_dir}", mesh=mesh).model, data.pairs, batch_size=4, mesh=mesh,
                             with_hidden=True, progress=False)  # batch 4 -> 8 (a multiple of the devices)
    cfg = loaded.model.config  # derived bounds (jaxpref.testing.tolerances): sums of negative token log-probs
    np.testing.assert_allclose(sharded.sums, plain.sums, rtol=tol.relative_tol(tol.transformer_chain_length(cfg, 64)))
    h_norm = np.sqrt(cfg.hidden_size) * float(np.abs(np.asarray(loaded.model.final_norm.scale_d[...])).max())
    np.testing.assert_allclose(sharded.hidden_sums, plain.hidden_sums, rtol=0, atol=(tol.hidden_state_tol(
        cfg, 64) + tol.relative_tol(64)) * h_norm * plain.counts.max())  # Σ_t ‖δh_t‖, ‖h_t‖ <= √D·max|scale|


def test_committed_smollm2_ranking_results_and_their_readme_numbers():
    """The committed SmolLM2 runs had no reference: they hold R / R̃ only (no self-referenced R* or gap), and
    the README's Evaluation section quotes them as they are."""
    root = pathlib.Path(__file__).resolve().parents[1]
    readme = " ".join((root / "README.md").read_text().split())
    quoted = []
    for name in ("llmfao300", "pandalm300"):
        res = json.loads((root / "bench" / "results" / f"smollm2_idealized_{name}.json").read_text())
        assert res["reference"] is None and "--reference" in res["needs_reference"]
        for key in ("idealized", "alignment_gap", "alignment_gap_normalized", "difficulty", "flip_categories"):
            assert key not in res, (name, key)
        assert res["n_evaluated"] == res["n_pairs"] - res["n_ties"]
        quoted.append((f"{100 * res['ranking_accuracy']:.1f}%", f"{100 * res['ranking_accuracy_normalized']:.1f}%",
                       str(res["n_evaluated"])))
    (r1, rn1, n1), (r2, rn2, n2) = quoted
    assert f"ranks {r1} (R) / {rn1} (R̃) of the {n1} non-tie pairs among the first 300 LLMFAO pairs" in readme
    assert f"and {r2} / {rn2} of the {n2} on PandaLM" in readme
