"""Checks that need an accelerator (marked ``gpu``: skipped with a reason on CPU).

They call :mod:`jaxpref.testing.device_checks`, the same functions ``bench/accelerator_suite.py`` runs and records
(its ``checks`` stage; ``--dry-run`` runs them on CPU, see ``tests/test_accelerator_suite.py``). Run them on a
GPU machine with ``python -m pytest -m gpu -n 0 tests/test_gpu.py``.
"""

from __future__ import annotations

import pathlib
import sys

import pytest

from jaxpref.testing import device_checks as D

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logprobs_on_the_device_match_cpu_float32(dtype):
    result = D.logprob_check(dtype)
    assert result["passed"], result


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dpo_step_on_the_device_matches_cpu_float32(dtype):
    result = D.dpo_step_check(dtype)
    assert result["passed"], result


def test_every_attention_backend_matches_xla_on_the_device():
    rows = D.attention_checks()
    failed = [r for r in rows if r["passed"] is False]
    assert not failed, failed
    served = {r["backend"] for r in rows if r["passed"]}
    assert {"xla", "blocked", "cudnn", "pallas_gpu"} <= served, served  # every GPU backend served some mask


def test_chunked_logprob_memory_on_the_device():
    """Compiled (never run) loss + grad of summed log-probs at V 128256, T 4096: the chunked path's peak is a
    fraction of the full-logits path's (which holds [N, T, V] float32 logits and their log-softmax)."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "bench"))
    import chunked_logprobs_memory as M

    naive = M.memory("naive", 4, 4096, 2048, 128256, "bfloat16", 128, 8192, "vd")
    chunked = M.memory("chunked", 4, 4096, 2048, 128256, "bfloat16", 128, 8192, "vd")
    logits_mib = 4 * 4096 * 128256 * 4 / 2**20
    assert naive["temp_mib"] > logits_mib  # the naive path really materialises the logits
    assert chunked["temp_mib"] < logits_mib / 8, (chunked, logits_mib)
