"""The paper's Table 3 and accuracy-versus-KV-memory plot from evaluation results.

Each source is an evaluation JSON (`launch/evaluate.py --out`) or a run folder, meaning its latest
`eval/step_N.json`. One row per source: layout, KV heads, KV bytes per token, accuracy per task and
their average. A row is on the Pareto front when no other row has at most its KV bytes and at least
its average accuracy (one of the two strictly).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

from ..errors import MLKVError
from ..integrity import atomic_output, write_json_atomic

METRIC = "acc"  # the paper reports accuracy for every task


class ReportError(MLKVError):
    """An unreadable report source; the message names the path."""


def latest_eval(run_dir: str | os.PathLike) -> Path:
    """`RUN_DIR/eval/step_N.json` with the largest N."""
    steps = {}
    for f in (Path(run_dir) / "eval").glob("step_*.json"):
        match = re.fullmatch(r"step_(\d+)\.json", f.name)
        if match:
            steps[int(match.group(1))] = f
    if not steps:
        raise ReportError(
            f"{run_dir} has no eval/step_N.json; run uptraining with --eval-tasks, "
            f"or pass an evaluation JSON from launch/evaluate.py"
        )
    return steps[max(steps)]


def load_source(source: str | os.PathLike) -> tuple[str, dict]:
    """(row label, evaluation dict) of an evaluation JSON or a run folder (its latest evaluation)."""
    path = Path(source)
    if path.is_dir():
        path = latest_eval(path)
        label = f"{Path(source).resolve().name} @ step {path.stem.removeprefix('step_')}"
    elif path.is_file():
        label = None
    else:
        raise ReportError(f"{source} does not exist; give evaluation JSONs or run folders")
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ReportError(f"{path}: cannot read it as JSON ({e})") from None
    missing = [k for k in ("results", "layout", "kv_bytes_per_token") if k not in result]
    if missing:
        raise ReportError(f"{path} lacks {', '.join(missing)}: it is not an evaluation JSON from launch/evaluate.py")
    return label or _model_label(result, path), result


def report_rows(sources: Sequence[str | os.PathLike], metric: str = METRIC) -> tuple[list[str], list[dict]]:
    """(task columns, one row per source), rows sorted by KV heads then owner layers, most first, with `average` and
    `pareto` set. A task a row lacks counts as missing, and its average is then None."""
    loaded = [load_source(s) for s in sources]
    tasks = list(dict.fromkeys(t for _, r in loaded for t in r.get("tasks", r["results"])))
    rows = []
    for (label, r), source in zip(loaded, sources):
        scores = {t: task_metric(r["results"].get(t, {}), metric) for t in tasks}
        known = [v for v in scores.values() if v is not None]
        rows.append(
            {
                "label": label,
                "source": str(source),
                "model": r.get("model"),
                "step": r.get("step"),
                "layout": r["layout"]["name"],
                "kv_layers": r["layout"]["kv_layers"],
                "num_kv_heads": r["layout"]["num_kv_heads"],
                "kv_heads": r["layout"]["kv_heads_total"],
                "kv_bytes_per_token": r["kv_bytes_per_token"],
                "kv_dtype": r.get("kv_dtype", "fp16"),
                "scores": scores,
                "average": sum(known) / len(known) if known and len(known) == len(tasks) else None,
                "limit": (r.get("config") or {}).get("limit"),  # lm-eval's --limit: documents per task
            }
        )
    _distinct_labels(rows)
    rows.sort(key=lambda row: (-row["kv_heads"], -row["kv_layers"]))  # the paper's order
    for row, on_front in zip(rows, pareto_front([(r["kv_bytes_per_token"], r["average"]) for r in rows])):
        row["pareto"] = on_front
    return tasks, rows


def _distinct_labels(rows: list[dict]) -> None:
    """Where two rows read alike (runs of one name under different folders), each label gains the
    folder its source lies in, so no two rows of a table share one."""
    labels = [r["label"] for r in rows]
    for r in rows:
        if labels.count(r["label"]) > 1:
            r["label"] = f"{Path(r['source']).resolve().parent.name}/{r['label']}"


def pareto_front(points: Sequence[tuple[float, float | None]]) -> list[bool]:
    """For (memory, accuracy) points: True where no other point has memory <= and accuracy >=, one
    of them strictly (less memory, higher accuracy is better). Points without accuracy are never on it."""

    def dominates(q, p):
        return q[0] <= p[0] and q[1] >= p[1] and (q[0] < p[0] or q[1] > p[1])

    scored = [p for p in points if p[1] is not None]
    return [p[1] is not None and not any(dominates(q, p) for q in scored) for p in points]


def format_table(tasks: Sequence[str], rows: Sequence[dict], metric: str = METRIC) -> str:
    """Markdown: model, layout, KV heads, KV bytes/token, `metric` per task, average, Pareto mark."""
    dtype = rows[0]["kv_dtype"] if rows else "fp16"
    head = ["model", "layout", "KV heads", f"KV bytes/token ({dtype})", *tasks, "avg", "Pareto"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["label"] + (f" (limit {r['limit']:g})" if r.get("limit") else ""),
            r["layout"],
            str(r["kv_heads"]),
            f"{r['kv_bytes_per_token']:,}",
            *(_fmt(r["scores"][t]) for t in tasks),
            _fmt(r["average"]),
            "*" if r["pareto"] else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    limited = (
        " (limit N): evaluated on at most N documents a task (--eval-limit), not comparable to full runs."
        if any(r.get("limit") for r in rows)
        else ""
    )
    return (
        "\n".join(lines) + f"\n\n{metric} per task; avg over the {len(tasks)} tasks; * on the Pareto front "
        f"(no other row has as little KV memory and as high an avg, one of them strictly better).{limited}"
    )


def point_labels(rows: Sequence[dict]) -> list[str]:
    """The name each row's point gets: its layout, or its row label (the run, without '@ step N')
    where several rows share the layout (ablations of one layout), so no two points read alike."""
    counts = {}
    for r in rows:
        counts[r["layout"]] = counts.get(r["layout"], 0) + 1
    return [r["layout"] if counts[r["layout"]] == 1 else r["label"].split(" @ step ")[0] for r in rows]


def plot_accuracy_vs_kv(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """PNG of average accuracy against KV bytes per token (log scale), the Pareto front marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    pts = [r for r in rows if r["average"] is not None]
    front = sorted((r for r in pts if r["pareto"]), key=lambda r: r["kv_bytes_per_token"])
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.scatter(
        [r["kv_bytes_per_token"] for r in pts], [r["average"] for r in pts], color="tab:gray", label="layouts", zorder=2
    )
    ax.step(
        [r["kv_bytes_per_token"] for r in front],
        [r["average"] for r in front],
        where="post",
        color="tab:red",
        linestyle="--",
        zorder=1,
    )
    ax.scatter(
        [r["kv_bytes_per_token"] for r in front],
        [r["average"] for r in front],
        color="tab:red",
        marker="*",
        s=140,
        label="Pareto front",
        zorder=3,
    )
    for r, name in zip(pts, point_labels(pts)):
        ax.annotate(
            name, (r["kv_bytes_per_token"], r["average"]), textcoords="offset points", xytext=(4, 4), fontsize=8
        )
    if pts and max(r["kv_bytes_per_token"] for r in pts) > 4 * min(r["kv_bytes_per_token"] for r in pts):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    dtype = rows[0]["kv_dtype"] if rows else "fp16"
    ax.set_xlabel(f"KV cache bytes per token ({dtype})")
    ax.set_ylabel(f"average {METRIC}")
    ax.set_title("Accuracy versus KV cache memory")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=150, format="png")
    plt.close(fig)
    return Path(path)


def build_report(sources: Sequence[str | os.PathLike], out_prefix: str | os.PathLike = "report") -> dict:
    """Table, JSON and plot for `sources`: writes PREFIX.md, PREFIX.json and PREFIX.png; returns the
    report dict (`tasks`, `rows`, `table`, `files`)."""
    if not sources:
        raise ReportError("no sources given; pass evaluation JSONs or run folders")
    tasks, rows = report_rows(sources)
    table = format_table(tasks, rows)
    prefix = str(out_prefix)
    files = {"markdown": prefix + ".md", "json": prefix + ".json", "plot": prefix + ".png"}
    report = {"metric": METRIC, "tasks": tasks, "rows": rows, "table": table, "files": files}
    with atomic_output(files["markdown"]) as tmp:
        tmp.write_text(table + "\n")
    write_json_atomic(files["json"], report)
    plot_accuracy_vs_kv(rows, files["plot"])
    return report


def task_metric(task_results: dict, metric: str = METRIC) -> float | None:
    """One task's `metric` from lm-eval's results (`acc,none`; `acc` in older lm-eval), None if absent
    or not finite. The one reader of accuracies (the report and bench_inference's accuracy plot)."""
    value = task_results.get(f"{metric},none", task_results.get(metric))
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _model_label(result: dict, path: Path) -> str:
    """'RUN @ step N' for an uptraining export RUN/hf/step_N, else the model folder's (or hub) name, with
    the checkpoint format when it is not ours (the paper's released 'pythia-mlkv' models)."""
    model = Path(result.get("model") or path.stem)
    if result.get("step") is not None and model.parent.name == "hf":
        return f"{model.parent.parent.name} @ step {result['step']}"
    fmt = result.get("format", "mlkv")
    return (model.name or path.stem) + ("" if fmt == "mlkv" else f" ({fmt})")
