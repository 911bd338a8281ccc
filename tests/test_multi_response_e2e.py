"""Training from, and evaluating on, multi-response rows (issue 18 item 4), end to end at tiny size.

The README's commands (section "More than two responses per prompt") run in-process on the committed
13-row example ``tests/data/ultrafeedback_tiny.jsonl`` (13 usable prompts with 3-5 responses, one row of
all-tied scores, one with a missing rating, one with a single response), with only size-limiting
overrides appended: ``train.preference`` with ``best_vs_random`` pairs and a 25 % hold-out of prompts,
evaluated during training, then ``eval.ranking`` on the held-out prompts. Its exact-match accuracy is
checked against a count made with ``scipy.stats.rankdata`` (Chen et al.'s released code), and its
per-response log-probs against the pair path of ``eval.ranking`` on the same prompts and responses.
"""

from __future__ import annotations

import json
import pathlib
import shlex

import numpy as np
import pytest
import scipy.stats

from jaxpref.testing.models import fast_compile

REPO = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "tests" / "data" / "ultrafeedback_tiny.jsonl"
SECTION = "### More than two responses per prompt"
TRAIN_LIMITS = ["train.steps=2", "train.batch_size=8", "train.eval_every=2", "data.max_length=64", "data.buckets=[64]",
                "logging.progress=false", "checkpoint.async_save=false",
                "train.seq_chunk=32", "train.vocab_chunk=256"]  # the last two: speed only
EVAL_LIMITS = ["--max-length", "64", "--batch-size", "4", "--no-progress"]
# By hand from the example file: rows 14 (missing rating) and 15 (single response) are rejected on reading;
# row 13 (scores 5, 5, 5) when pairs are derived; 14 prompts are read, 4 of them held out.
READ_REJECTS = {14: ("missing_score", "completions[1].overall_score"), 15: ("too_few_responses", "completions")}
ALL_TIED = 13


def _readme_commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    section = text[text.index(SECTION):]
    block = section[section.index("```bash\n") + len("```bash\n"):]
    block = block[:block.index("```")]
    return [argv for raw in block.replace("\\\n", " ").splitlines() if (argv := shlex.split(raw, comments=True))]


def _rows() -> list[dict]:
    return [json.loads(x) for x in EXAMPLE.read_text().splitlines()]


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory) -> pathlib.Path:
    """The README block run in a scratch directory laid out like the repository; returns that directory."""
    from eval import ranking
    from train import preference

    work = tmp_path_factory.mktemp("uf")
    for name in ("configs", "tests"):
        (work / name).symlink_to(REPO / name)
    cmds = _readme_commands()
    assert [c[:3] for c in cmds] == [["python", "-m", "train.preference"], ["python", "-m", "eval.ranking"]]
    mp = pytest.MonkeyPatch()
    mp.chdir(work)
    try:
        with fast_compile():
            preference.main([*cmds[0][3:], *TRAIN_LIMITS])
            ranking.main([*cmds[1][3:], *EVAL_LIMITS])
    finally:
        mp.undo()
    return work


def test_every_row_is_kept_or_rejected_with_its_reason(readme_run):
    run = readme_run / "runs" / "uf_tiny"
    data = json.loads((run / "summary.json").read_text())["data"]
    rejects = {r["row"]: (r["reason"], r["field"]) for r in map(json.loads, (run / "rejects.jsonl").open())}
    assert {k: v for k, v in rejects.items() if k in READ_REJECTS} == READ_REJECTS
    assert rejects[ALL_TIED][0] == "all_tied" and len(rejects) == 3
    split = json.loads((run / "eval_split.json").read_text())
    assert split["n_records"] == 14 and split["n_eval"] == 4  # round(0.25 * 14) prompts
    train, held = data["pairs"], data["eval"]["pairs"]
    assert train["mode"] == held["mode"] == "best_vs_random"
    # input rows = read rejects + prompts in training + held-out prompts; kept = rows with a pair
    assert len(READ_REJECTS) + train["rows"] + held["rows"] == len(_rows())
    assert train["rows_with_pairs"] + held["rows_with_pairs"] + 1 == 14  # one row all tied
    assert data["rows_kept"] == train["pairs"] == train["rows_with_pairs"]  # one pair per prompt
    skipped = [json.loads(x) for x in (run / "pairs_skipped.jsonl").read_text().splitlines()]
    skipped += [json.loads(x) for x in (run / "eval_pairs_skipped.jsonl").read_text().splitlines()]
    # a response tied with the best in rows 2, 4 and 8 (by hand; no other best has a tie) and row 13's two
    assert sorted((s["row"], s["reason"]) for s in skipped) == [(2, "tie"), (4, "tie"), (8, "tie"), (13, "tie"),
                                                                (13, "tie")]
    assert held["rows_with_pairs"] == 4 - (ALL_TIED in split["rows"])
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted({m["step"] for m in metrics if "eval/pairs" in m}) == [0, 2]
    assert all(m["eval/pairs"] == held["pairs"] for m in metrics if "eval/pairs" in m)


def test_training_pairs_are_best_vs_a_lower_response_of_training_prompts(readme_run):
    from jaxpref.config import RunConfig, load_config
    from jaxpref.data import multi_response

    run = readme_run / "runs" / "uf_tiny"
    cfg = load_config(RunConfig, run / "config.yaml")
    split = set(json.loads((run / "eval_split.json").read_text())["rows"])
    records, rejects, _ = multi_response.load_records(EXAMPLE, format="ultrafeedback")
    train = [r for r in records if r.row not in split]
    pairs = multi_response.derive_pairs(train, cfg.data.multi_pairs, seed=cfg.train.seed).records
    rows = _rows()
    for p in pairs:
        source = int(p.id.split(":")[1])  # "row:<n>:<i>><j>"
        assert source not in split
        scores = {c["response"]: c.get("overall_score") for c in rows[source]["completions"]}
        assert scores[p.chosen] == max(scores.values()) > scores[p.rejected]


def test_eval_ranking_exact_match_equals_a_rankdata_count(readme_run):
    out = json.loads((readme_run / "out" / "uf_rank" / "ranking.json").read_text())
    per = [json.loads(x) for x in (readme_run / "out" / "uf_rank" / "per_example.jsonl").read_text().splitlines()]
    split = json.loads((readme_run / "runs" / "uf_tiny" / "eval_split.json").read_text())
    assert out["metric"] == "exact_match" and [p["row"] for p in per] == split["rows"]

    def ranks(x):  # Chen's code: n + 1 - rankdata(method="max"), rank 1 = best
        return (len(x) + 1 - scipy.stats.rankdata(x, method="max")).tolist()

    hand = [ranks(p["logp"]) == ranks(p["scores"]) for p in per]
    hand_n = [ranks(p["logp_mean"]) == ranks(p["scores"]) for p in per]
    assert out["ranking_accuracy"] == pytest.approx(np.mean(hand))
    assert out["ranking_accuracy_normalized"] == pytest.approx(np.mean(hand_n))
    assert [p["human_rank"] for p in per] == [ranks(p["scores"]) for p in per]


def test_every_response_scores_as_in_a_pair(readme_run, tmp_path):
    """Each response's log-prob equals what eval.ranking's pair path gives it against the first response."""
    from eval import ranking

    per = [json.loads(x) for x in (readme_run / "out" / "uf_rank" / "per_example.jsonl").read_text().splitlines()]
    rows = _rows()
    pairs = [{"id": f"{p['row']}:{k}", "prompt": rows[p["row"]]["instruction"],
              "chosen": rows[p["row"]]["completions"][k]["response"],
              "rejected": rows[p["row"]]["completions"][0]["response"]} for p in per for k in range(1, p["n"])]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in pairs))
    with fast_compile():
        ranking.main(["--model", f"run:{readme_run / 'runs' / 'uf_tiny'}", "--data", str(path), "--out",
                      str(tmp_path / "pairs"), *EVAL_LIMITS])
    got = {r["id"]: r for r in map(json.loads, (tmp_path / "pairs" / "per_example.jsonl").open())}
    for p in per:
        for k in range(1, p["n"]):
            r = got[f"{p['row']}:{k}"]
            # float32 sums of < 64 log-probs, scored in differently packed rows
            assert r["chosen_logp"] == pytest.approx(p["logp"][k], rel=1e-5, abs=1e-4)
            assert r["rejected_logp"] == pytest.approx(p["logp"][0], rel=1e-5, abs=1e-4)


def test_all_bad_rows_is_one_line_naming_file_row_and_key(tmp_path, capsys):
    from train import preference

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "responses": ["a", "b"], "scores": [1, "N/A"]}) + "\n")
    with pytest.raises(SystemExit) as info:
        preference.main(["--config", str(REPO / "configs" / "base.yaml"), f"run_dir={tmp_path / 'run'}",
                         f"data.train={bad}", "logging.progress=false"])
    msg = str(info.value)
    assert msg.startswith("error: ") and "\n" not in msg
    assert str(bad) in msg and "row 0" in msg and "key scores[1]" in msg and "missing_score" in msg
