"""The README's per-device memory table for DPO, compiled by the planner (:mod:`jaxpref.training.plan`).

Grid: presets x precision (bf16 params + f32 Adam moments, or everything f32) x remat (off / full) x
T (2048 / 8192) x reference (live / precomputed) x devices (8 / 64, all on the ``fsdp`` axis), one pair
(two sequences) per device, AdamW, sigmoid DPO, layers scanned (``model.scan_layers``, the layout for
models of this size: with an unrolled stack XLA:CPU keeps every layer's gathered weights and recomputed
activations alive at once, so remat saved almost nothing; ``results/plan/dpo_memory_unrolled.json`` holds
the earlier unrolled grid and :func:`layout_sentence` compares one cell of the two).
``python -m train.plan --grid --out FILE`` compiles the cells missing from ``FILE`` (cheapest first,
saving after each), ``--table`` renders the table from it. The committed JSON may hold a subset of the
grid (``--time-limit``); the table shows only compiled rows and says how many cells it has.
"""

from __future__ import annotations

import json
import logging
import pathlib
import time
from typing import Any

log = logging.getLogger(__name__)

PRESETS = ("llama3_2_1b", "llama3_2_3b", "llama3_8b", "qwen2_5_7b", "llama3_1_70b")
PRECISIONS: dict[str, tuple[str, ...]] = {
    "bf16 + f32 Adam": ("model.param_dtype=bfloat16", "model.compute_dtype=bfloat16", "optim.state_dtype=float32"),
    "all f32": ("model.param_dtype=float32", "model.compute_dtype=float32"),
}
REMAT = (False, True)
SEQ_LENS = (2048, 8192)
REFERENCES = ("live", "precomputed")
DEVICES = (8, 64)
LAYOUT = ("model.scan_layers=true",)
README_BEGIN, README_END = "<!-- plan-table:begin -->", "<!-- plan-table:end -->"


def cell_key(preset: str, precision: str, remat: bool, t: int, reference: str, devices: int) -> str:
    return f"{preset}|{precision}|remat={'on' if remat else 'off'}|T={t}|{reference}|{devices}"


def overrides(preset: str, precision: str, remat: bool, t: int, reference: str, devices: int) -> list[str]:
    """The run-config overrides of one cell."""
    return [f"model.source=preset:{preset}", *PRECISIONS[precision], f"model.remat={str(remat).lower()}",
            f"data.max_length={t}", f"data.buckets=[{t}]", f"train.batch_size={devices}", "train.micro_batches=1",
            "mesh.data=1", f"mesh.fsdp={devices}", "mesh.tensor=1", f"reference.strategy={reference}",
            "optim.name=adamw", "loss=[{name: sigmoid, hparams: {beta: 0.1}}]", *LAYOUT]


def cells(presets=PRESETS, devices=DEVICES, seq_lens=SEQ_LENS) -> list[tuple]:
    """Every cell, cheapest compile first: by preset size, then T, devices, remat, precision, reference."""
    from jaxpref.models import presets as model_presets

    names = [p for p in presets if p in model_presets.PRESETS]
    size = {p: model_presets.get_preset(p).num_params() for p in names}
    return [(p, prec, r, t, ref, d) for p in sorted(names, key=size.get) for t in seq_lens for d in devices
            for r in REMAT for prec in PRECISIONS for ref in REFERENCES]


def run_grid(path: str | pathlib.Path, *, presets=PRESETS, devices=DEVICES, seq_lens=SEQ_LENS,
             time_limit_s: float | None = None) -> dict[str, Any]:
    """Compiles the cells missing from the JSON at ``path`` (created if absent), saving after each;
    stops starting new ones after ``time_limit_s``."""
    import jax

    from jaxpref.config import RunConfig, load_config
    from jaxpref.training import plan as planlib

    path = pathlib.Path(path)
    data = json.loads(path.read_text()) if path.is_file() else {"cells": {}}
    data["grid"] = {"presets": list(PRESETS), "precisions": list(PRECISIONS), "remat": ["off", "full"],
                    "seq_lens": list(SEQ_LENS), "references": list(REFERENCES), "devices": list(DEVICES),
                    "pairs_per_device": 1, "optimizer": "adamw", "loss": "sigmoid (DPO)", "layers": "scanned"}
    data["note"] = planlib.CPU_NOTE
    t0 = time.perf_counter()
    for cell in cells(presets, devices, seq_lens):
        key = cell_key(*cell)
        if key in data["cells"]:
            continue
        if time_limit_s is not None and time.perf_counter() - t0 > time_limit_s:
            log.info("time limit reached: %s and later cells not compiled", key)
            break
        n = cell[-1]
        if len(jax.devices()) < n:
            raise planlib.PlanError(f"the grid needs {n} devices, {len(jax.devices())} here (--devices {n})")
        cfg = load_config(RunConfig, None, overrides(*cell))
        p = planlib.plan(cfg, devices=jax.devices()[:n])
        data["cells"][key] = {k: p[k] for k in ("model", "num_params", "param_dtype", "compute_dtype", "remat",
                                                "reference", "devices", "mesh", "batch_size", "seq_len",
                                                "bytes_per_device", "compiled", "compile_s", "platform")}
        data["cells"][key]["audit_findings"] = len(p["audit"])
        data["cells"][key]["scan_layers"] = cfg.model.scan_layers
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        log.info("%s: peak %.2f GiB per device (compile %.0f s)", key, p["compiled"]["peak"] / 2 ** 30,
                 p["compile_s"])
    return data


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:.1f}"


def table(data: dict[str, Any]) -> str:
    """Markdown: one row per (preset, precision, remat, T) with any compiled cell; columns live /
    precomputed reference on 8 and 64 devices; each cell ``peak (state + reference)`` GiB per device."""
    found = data["cells"]
    cols = [(ref, d) for d in DEVICES for ref in REFERENCES]
    head = "| model | precision | remat | T | " + " | ".join(f"{ref}, {d} dev" for ref, d in cols) + " |"
    lines = [head, "|" + "---|" * (4 + len(cols))]
    for preset in PRESETS:
        for precision in PRECISIONS:
            for remat in REMAT:
                for t in SEQ_LENS:
                    row = [found.get(cell_key(preset, precision, remat, t, ref, d)) for ref, d in cols]
                    if not any(row):
                        continue
                    texts = []
                    for c in row:
                        if c is None:
                            texts.append("not compiled")
                            continue
                        b = c["bytes_per_device"]
                        state = b["params"] + b["optimizer"] + b["reference"]
                        texts.append(f"{_gib(c['compiled']['peak'])} ({_gib(state)})")
                    lines.append(f"| {preset} | {precision} | {'full' if remat else 'off'} | {t} | "
                                 + " | ".join(texts) + " |")
    total = len(PRESETS) * len(PRECISIONS) * len(REMAT) * len(SEQ_LENS) * len(cols)
    lines.append("")
    layers = data.get("grid", {}).get("layers", "unrolled")
    lines.append(f"GiB per device: compiled peak (parameters + optimizer state + reference parameters), layers "
                 f"{layers}. {len(found)} of {total} grid cells compiled; {data.get('note', '')}.")
    return "\n".join(lines) + "\n"


LAYOUT_EXAMPLE = ("llama3_2_1b", "bf16 + f32 Adam", True, 2048, "live", 8)


def layout_sentence(scanned: dict[str, Any], unrolled: dict[str, Any], cell: tuple = LAYOUT_EXAMPLE) -> str:
    """The README's sentence on why the grid scans its layers: one cell's peak in both grids."""
    key = cell_key(*cell)
    preset, precision, remat, t, reference, devices = cell
    return (f"{preset}, {precision}, remat {'full' if remat else 'off'}, T {t}, {reference} reference, "
            f"{devices} devices: {_gib(unrolled['cells'][key]['compiled']['peak'])} GiB per device unrolled, "
            f"{_gib(scanned['cells'][key]['compiled']['peak'])} GiB scanned")


def replace_readme_table(readme: str | pathlib.Path, text: str) -> None:
    """Rewrites the part of ``readme`` between :data:`README_BEGIN` and :data:`README_END`; ValueError
    unless the file has exactly one pair of markers."""
    path = pathlib.Path(readme)
    content = path.read_text()
    if content.count(README_BEGIN) != 1 or content.count(README_END) != 1:
        raise ValueError(f"{path}: needs exactly one {README_BEGIN} ... {README_END} pair")
    head, rest = content.split(README_BEGIN)
    _, tail = rest.split(README_END)
    path.write_text(f"{head}{README_BEGIN}\n{text}{README_END}{tail}")
