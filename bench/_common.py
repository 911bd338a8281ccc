"""Shared helpers of the benchmark scripts: environment record, timing statistics, JSON output.

Every result file holds ``env`` (device kind, CPU model, core count, versions), ``load_avg``
(the 1/5/15-minute load averages before and after the measurement: this machine is shared, so
read every number together with them) and the script's own ``config`` and ``results``.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import resource
import statistics
import time

import numpy as np

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers", "trl", "accelerate")


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def env(jax_device: bool = True) -> dict:
    """Where the numbers come from. ``jax_device`` imports jax to read the device kind."""
    info = {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "versions": versions(),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}
    if jax_device:
        import jax

        dev = jax.devices()[0]
        info["device"] = f"{dev.device_kind} ({cpu_model()})" if dev.platform == "cpu" else dev.device_kind
        info["jax_platform"] = dev.platform
    return info


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def peak_rss_mib() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summarize(seconds: list[float]) -> dict:
    """Median / min / max of repeated timings (seconds)."""
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds),
            "n": len(seconds), "all_s": [round(s, 5) for s in seconds]}


def timeit(fn, *, warmup: int, repeats: int) -> dict:
    """Runs ``fn()`` (which must block until its work is done) ``warmup`` + ``repeats`` times."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return summarize(times)


def write(name: str, payload: dict, out: str | None = None) -> pathlib.Path:
    """Writes ``payload`` (plus a timestamp) to ``out`` or ``bench/results/<name>.json``."""
    path = pathlib.Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "timestamp": datetime.datetime.now().isoformat(timespec="seconds"), **payload}
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    return path


# ----------------------------------------------------------------------------------- shared workloads


def llama_config(size: str, vocab: int, seq: int):
    """A Llama-architecture :class:`ModelConfig` from ``"LAYERSxHIDDEN"`` (heads = hidden / 64, MLP 8/3 D)."""
    from jaxpref.models import presets

    layers, hidden = (int(x) for x in size.lower().split("x"))
    inter = -(-int(hidden * 8 / 3) // 64) * 64  # Llama's 8/3 D, rounded up to a multiple of 64
    return presets.tiny_llama(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                              num_heads=hidden // 64, num_kv_heads=hidden // 64, head_dim=64,
                              max_position_embeddings=max(seq, 2048), bos_token_id=1, eos_token_id=2,
                              pad_token_id=0)


def random_pairs(batch: int, seq: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    """Random pairs: shared prompt of T/8..T/4 tokens, total length 3T/4..T, the first chosen exactly T.

    Returns ``ids [B, 2, T]`` (unpadded values everywhere), ``prompt_len [B]``, ``total [B, 2]``.
    """
    rng = np.random.default_rng(seed)
    prompt_len = rng.integers(seq // 8, seq // 4 + 1, batch)
    total = rng.integers(3 * seq // 4, seq + 1, (batch, 2))
    total[0, 0] = seq
    ids = rng.integers(3, vocab, (batch, 2, seq)).astype(np.int32)
    ids[:, 1] = np.where(np.arange(seq)[None] < prompt_len[:, None], ids[:, 0], ids[:, 1])
    return {"ids": ids, "prompt_len": prompt_len, "total": total}


def pair_arrays(pairs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Right-padded ``[B, 2, T]`` arrays (pad id 0) of :func:`random_pairs`: the PairBatch fields."""
    ids, plen, total = pairs["ids"], pairs["prompt_len"], pairs["total"]
    b, _, t = ids.shape
    pos = np.arange(t)
    seg = (pos[None, None] < total[..., None]).astype(np.int32)
    mask = (seg.astype(bool) & (pos[None, None] >= plen[:, None, None])).astype(np.int32)
    return {"input_ids": ids * seg, "loss_mask": mask, "segment_ids": seg, "positions": (pos * seg).astype(np.int32),
            "example_mask": np.ones(b, bool), "votes": np.ones(b, np.float32), "index": np.arange(b, dtype=np.int32)}


def op_profile(run, steps: int = 3) -> dict[str, float]:
    """ms/step per XLA op kind (``ynn_fusion``, ``copy_bitcast_fusion``, ...) of ``run()`` from a perfetto
    trace (the top 20). Needs ``XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true`` before JAX starts."""
    import collections
    import gzip
    import re
    import tempfile

    import jax

    out = tempfile.mkdtemp()
    with jax.profiler.trace(out, create_perfetto_trace=True):
        for _ in range(steps):
            run()
    trace = json.load(gzip.open(next(pathlib.Path(out).rglob("*.trace.json.gz"))))
    kinds: collections.Counter = collections.Counter()
    for e in trace["traceEvents"] if isinstance(trace, dict) else trace:
        name = e.get("name", "")
        if e.get("ph") == "X" and not name.startswith("$") and "Execute" not in name and "Pjit" not in name:
            kinds[re.sub(r"\.\d+$", "", name)] += e.get("dur", 0) / 1e3 / steps
    return {k: round(v, 2) for k, v in kinds.most_common(20)}
