"""A Markdown (+ simple HTML) report of a run: training curves and every evaluation result found.

    python -m eval.report --run RUN_DIR [--eval-dir DIR ...] [--out RUN_DIR/report]

Plots the numeric columns of ``metrics.jsonl`` (grouped by prefix: loss, rewards/, logps/, norms, ...;
the held-out ``eval/...`` rows of ``train.eval_every`` in their own groups: eval_loss, eval_ranking,
eval_gap, eval_displacement, ...) over steps as PNGs, then lists every result JSON under the run
directory and the given ``--eval-dir`` s
(``summary.json``, ``ranking.json``, ``ches`` ``summary.json``, ``displacement.json``, ``win_rate.json``,
... -- checkpoints, TensorBoard files and the report itself are skipped) as tables of their scalar
values, with the PNGs found next to them. Writes ``report.md`` and ``report.html`` into ``--out``.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import pathlib

from eval import common

SKIP_DIRS = {"checkpoints", "tensorboard", "report"}
MAX_ROWS = 60
# metrics.jsonl keys the curves use: the x axis, and counters that are not plotted (preference runs log
# tokens / pairs / nonfinite, SFT runs tokens / target_tokens). tests/test_demo.py checks them against real runs.
STEP_KEY = "step"
NOT_PLOTTED = ("tokens", "pairs", "nonfinite", "target_tokens")
EVAL_PREFIX = "eval/"  # held-out rows logged during training (jaxpref.training.eval_during): their own plots
EVAL_COUNTERS = ("eval/pairs", "eval/examples", "eval/prompts", "eval/compiles")  # not plotted either
EVAL_GROUPS = (("gap", ("alignment_gap",)), ("ranking", ("ranking_accuracy", "R_star")),
               ("displacement", ("_change_mean", "_logp_mean", "displaced")))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="jaxpref run directory")
    p.add_argument("--eval-dir", action="append", default=[], help="more directories with eval results")
    p.add_argument("--out", default=None, help="output directory (default RUN_DIR/report)")
    return p


def _read_metrics(path: pathlib.Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill
    return rows


def _group(key: str) -> str:
    if key.startswith(EVAL_PREFIX):
        rest = key[len(EVAL_PREFIX):]
        for name, parts in EVAL_GROUPS:
            if any(p in rest for p in parts):
                return EVAL_PREFIX + name
        return EVAL_PREFIX + _group(rest)
    if key in ("loss",) or key.startswith("loss/"):
        return "loss"
    if key.endswith("_norm"):
        return "norms"
    if "/" in key:
        return key.split("/")[-2] if key.count("/") > 1 else key.split("/")[0]
    return "other"


def plot_curves(rows: list[dict], out: pathlib.Path) -> list[pathlib.Path]:
    """One PNG per metric group; returns the files."""
    from jaxpref.evaluation import pyplot

    keys = sorted({k for r in rows for k, v in r.items() if k != STEP_KEY and isinstance(v, int | float)})
    groups: dict[str, list[str]] = {}
    for k in keys:
        if k in NOT_PLOTTED or k in EVAL_COUNTERS:
            continue
        groups.setdefault(_group(k), []).append(k)
    plt = pyplot()
    files = []
    for name, ks in sorted(groups.items()):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for k in ks[:12]:
            pts = [(r[STEP_KEY], r[k]) for r in rows if isinstance(r.get(k), int | float) and math.isfinite(r[k])]
            if pts:  # eval rows are sparse (every train.eval_every steps): markers
                ax.plot(*zip(*pts), "o-" if k.startswith(EVAL_PREFIX) else "-", label=k, lw=1.2, ms=3)
        ax.set(xlabel="step", title=name)
        if any(k == "lr" for k in ks) or name == "norms":
            ax.set_yscale("symlog" if name == "norms" else "linear")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"curves_{name.replace('/', '_')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files.append(path)
    return files


def _flatten(obj, prefix: str = "", depth: int = 0) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    if isinstance(obj, dict) and depth < 4:
        for k, v in obj.items():
            out.extend(_flatten(v, f"{prefix}.{k}" if prefix else str(k), depth + 1))
    elif isinstance(obj, int | float | str | bool) or obj is None:
        if not (isinstance(obj, str) and len(obj) > 200):
            out.append((prefix, obj))
    elif isinstance(obj, list) and len(obj) <= 8 and all(isinstance(x, int | float | str) for x in obj):
        out.append((prefix, ", ".join(map(str, obj))))
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else str(v)


def find_results(dirs: list[pathlib.Path], out: pathlib.Path) -> list[pathlib.Path]:
    found = []
    for d in dirs:
        for root, subdirs, files in os.walk(d):
            root_p = pathlib.Path(root)
            subdirs[:] = sorted(s for s in subdirs if s not in SKIP_DIRS and root_p / s != out)
            found.extend(root_p / f for f in sorted(files) if f.endswith(".json") and f != "model.json")
    return found


def main(argv=None) -> pathlib.Path:
    args = _parser().parse_args(argv)
    common.setup_logging()
    run = pathlib.Path(args.run).expanduser().resolve()
    if not run.is_dir():
        common.fail(FileNotFoundError(f"run directory {run} not found"))
    out = pathlib.Path(args.out).resolve() if args.out else run / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = _read_metrics(run / "metrics.jsonl")
    curves = plot_curves(rows, out) if rows else []
    dirs = [run] + [pathlib.Path(d).expanduser().resolve() for d in args.eval_dir]
    results = find_results(dirs, out)

    md = [f"# Report: `{run.name}`", "", f"Run directory: `{run}`", ""]
    body = [f"<h1>Report: {html.escape(run.name)}</h1>", f"<p>Run directory: <code>{html.escape(str(run))}</code></p>"]
    md += ["## Training curves", ""]
    body.append("<h2>Training curves</h2>")
    if not curves:
        md.append("No `metrics.jsonl` rows.")
        body.append("<p>No metrics.jsonl rows.</p>")
    for c in curves:
        rel = os.path.relpath(c, out)
        md += [f"![{c.stem}]({rel})", ""]
        body.append(f'<img src="{html.escape(rel)}" alt="{html.escape(c.stem)}">')
    md += ["## Results", ""]
    body.append("<h2>Results</h2>")
    for path in results:
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        flat = _flatten(obj)
        if not flat:
            continue
        shown = os.path.relpath(path, run) if path.is_relative_to(run) else str(path)
        md += [f"### `{shown}`", "", "| key | value |", "|---|---|"]
        md += [f"| {k} | {_fmt(v).replace('|', '/')} |" for k, v in flat[:MAX_ROWS]]
        if len(flat) > MAX_ROWS:
            md.append(f"| ... | {len(flat) - MAX_ROWS} more in the file |")
        md.append("")
        body.append(f"<h3>{html.escape(shown)}</h3><table><tr><th>key</th><th>value</th></tr>")
        body += [f"<tr><td>{html.escape(k)}</td><td>{html.escape(_fmt(v))}</td></tr>" for k, v in flat[:MAX_ROWS]]
        body.append("</table>")
        for png in sorted(path.parent.glob("*.png")):
            if path.parent == run or png.parent == out:
                continue
            rel = os.path.relpath(png, out)
            md += [f"![{png.stem}]({rel})", ""]
            body.append(f'<img src="{html.escape(rel)}" alt="{html.escape(png.stem)}">')
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    style = "body{font-family:sans-serif;max-width:1000px;margin:auto}table{border-collapse:collapse}" \
            "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}img{max-width:48%;margin:4px}"
    (out / "report.html").write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(run.name)}"
                                     f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n",
                                     encoding="utf-8")
    print(f"report: {out / 'report.md'} ({len(curves)} curve plots, {len(results)} result files)")
    return out / "report.md"


if __name__ == "__main__":
    main()
