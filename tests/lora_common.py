"""Shared pieces of the in-process LoRA run tests (test_lora_eval.py, test_lora_reference.py; their ``pairs8``
fixture is in conftest.py)."""

from __future__ import annotations

import json

import numpy as np

LN2 = float(np.float32(np.log(2)))
COMMON = ["model.source=preset:tiny_llama", "model.tokenizer=builtin", "model.overrides={vocab_size: 512}",
          "data.max_length=32", "data.buckets=[32]", "train.batch_size=8", "logging.progress=false",
          "logging.tensorboard=false", "train.seq_chunk=32", "train.vocab_chunk=256", "optim.lr=1e-2",
          "train.steps=1", "checkpoint.async_save=false"]


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
