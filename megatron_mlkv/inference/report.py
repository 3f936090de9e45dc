"""bench_inference's report: one summary row per model, the tables, and the plots (memory and
tokens/s against batch size, accuracy against KV memory).

OUTDIR/results.json (the records), summary.md, memory.png, throughput.png; with evaluation files
accuracy.png and accuracy.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import BenchError

# the baselines: transformers' engines and the cache_implementation each runs with
TRANSFORMERS = {"transformers": "dynamic", "transformers-static": "static"}

# ------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------


def _series(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    out = {}
    for r in records:
        out.setdefault((r["model"], r["engine"]), []).append(r)
    return {k: sorted(v, key=lambda r: r["batch_size"]) for k, v in out.items()}


def _label(model: str, engine: str, layout: str) -> str:
    """'MLKV-6', 'MHA (transformers)', or 'MLKV-6: <folder>' for a folder."""
    name = layout if engine == "mlkv-fast" else f"{layout} ({engine})"
    return name if ":" in model else f"{name}: {Path(model).name}"


def transformers_best(records: list[dict]) -> dict[int, float]:
    """{batch: tokens/s of the faster transformers engine at that batch} over the baseline's records."""
    best = {}
    for r in records:
        if r["engine"] in TRANSFORMERS and not r["oom"]:
            best[r["batch_size"]] = max(best.get(r["batch_size"], 0.0), r["tokens_per_s"])
    return best


def summarize(records: list[dict]) -> list[dict]:
    """Per model and engine: maximum batch that fit, first OOM, tokens/s at batch 8 and at the maximum,
    and against transformers (the faster of its engines): at batch 8, and best against best."""
    baseline = transformers_best(records)
    rows = []
    for (model, engine), rs in _series(records).items():
        fits = [r for r in rs if not r["oom"]]
        ooms = [r["batch_size"] for r in rs if r["oom"]]
        best = max(fits, key=lambda r: r["batch_size"]) if fits else None
        at8 = next((r for r in fits if r["batch_size"] == 8), None)
        rows.append(
            dict(
                model=model,
                engine=engine,
                layout=rs[0]["layout"],
                kv_heads_total=rs[0]["kv_heads_total"],
                max_batch=best and best["batch_size"],
                first_oom=min(ooms) if ooms else None,
                tokens_per_s_b8=at8 and at8["tokens_per_s"],
                fraction_b8=at8 and at8["fraction_of_bound"],
                tokens_per_s_max=best and best["tokens_per_s"],
                fraction_max=best and best["fraction_of_bound"],
                peak_gib_max=best and best["peak_memory_bytes"] and best["peak_memory_bytes"] / 2**30,
                best_tokens_per_s=max((r["tokens_per_s"] for r in fits), default=None),
            )
        )
        row = rows[-1]
        ours = engine not in TRANSFORMERS
        row["vs_transformers_b8"] = (at8["tokens_per_s"] / baseline[8]) if ours and at8 and baseline.get(8) else None
        row["vs_transformers_best"] = (
            row["best_tokens_per_s"] / max(baseline.values())
            if ours and baseline and row["best_tokens_per_s"]
            else None
        )
    return rows


def format_summary(rows: list[dict]) -> str:
    """`summarize` rows as a markdown table."""

    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = [
        "| model | engine | KV heads | max batch | first OOM | tokens/s b=8 (of bound) | "
        "tokens/s at max (of bound) | best tokens/s | peak GiB at max | x transformers b=8 | "
        "x transformers, best |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {_label(r['model'], r['engine'], r['layout'])} | {r['engine']} | {r['kv_heads_total']} | "
            f"{num(r['max_batch'], 'd')} | {num(r['first_oom'], 'd')} | "
            f"{num(r['tokens_per_s_b8'], ',.0f')} ({num(r['fraction_b8'], '.0%')}) | "
            f"{num(r['tokens_per_s_max'], ',.0f')} ({num(r['fraction_max'], '.0%')}) | "
            f"{num(r['best_tokens_per_s'], ',.0f')} | {num(r['peak_gib_max'], '.2f')} | "
            f"{num(r['vs_transformers_b8'], '.2f')} | {num(r['vs_transformers_best'], '.2f')} |"
        )
    return "\n".join(lines)


MARKERS = "os^vDP*<>hX"  # series that overlap (equal KV budgets) stay distinguishable


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_memory(records: list[dict], path: Path) -> None:
    """Memory vs batch size (the paper's Figure 3): peak memory above the weights (the KV cache alone
    where no peak was measured, on CPU) with each model's first OOM marked x."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    capacity = next((r["device_memory_bytes"] for r in records if r.get("device_memory_bytes")), None)
    for i, ((model, engine), rs) in enumerate(_series(records).items()):
        fits = [r for r in rs if not r["oom"]]
        label = _label(model, engine, rs[0]["layout"])
        style = dict(marker=MARKERS[i % len(MARKERS)], ms=4, ls="-" if engine == "mlkv-fast" else "--")
        if fits and fits[0]["peak_memory_bytes"] is not None:
            (line,) = ax.plot(
                [r["batch_size"] for r in fits], [r["peak_memory_bytes"] / 2**30 for r in fits], label=label, **style
            )
        else:
            (line,) = ax.plot(
                [r["batch_size"] for r in fits],
                [r["kv_cache_bytes"] / 2**30 for r in fits],
                label=f"{label} (KV cache)",
                **style,
            )
        ooms = [r for r in rs if r["oom"]]
        if ooms:
            first = min(ooms, key=lambda r: r["batch_size"])
            y = capacity / 2**30 if capacity else first["kv_cache_bytes"] / 2**30
            ax.plot([first["batch_size"]], [y], "x", color=line.get_color(), ms=10, mew=2)
    if capacity:
        ax.axhline(capacity / 2**30, color="gray", lw=0.8, ls="--")
        ax.text(
            0.01,
            capacity / 2**30,
            "device memory (x: out of memory)",
            va="bottom",
            fontsize=8,
            color="gray",
            transform=ax.get_yaxis_transform(),
        )  # x in axes fractions, y in GiB
    ctx = records[0]
    ax.set(
        xscale="log",
        xlabel="batch size",
        ylabel="GiB",
        title=f"Memory above weights, context {ctx['context']} + {ctx['new_tokens']} tokens ({ctx['dtype']})",
    )
    ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_throughput(records: list[dict], path: Path) -> None:
    """Decode tokens/s vs batch size (solid) with each model's bandwidth bound (dotted)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, ((model, engine), rs) in enumerate(_series(records).items()):
        fits = [r for r in rs if not r["oom"]]
        if not fits:
            continue
        b = [r["batch_size"] for r in fits]
        (line,) = ax.plot(
            b,
            [r["tokens_per_s"] for r in fits],
            "-" if engine == "mlkv-fast" else "--",
            marker=MARKERS[i % len(MARKERS)],
            ms=4,
            label=_label(model, engine, rs[0]["layout"]),
        )
        ax.plot(b, [r["bandwidth_bound_tokens_per_s"] for r in fits], ":", color=line.get_color(), lw=0.8)
    ctx = records[0]
    ax.set_xscale("log", base=2)
    ax.set(
        yscale="log",
        xlabel="batch size",
        ylabel="tokens/s",
        title=f"Decode throughput, context {ctx['context']}, {ctx['new_tokens']} new tokens (dotted: bandwidth bound)",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_eval(path: str | Path) -> dict:
    """An evaluation JSON (lm-eval's `results` mapping plus `layout`) -> layout name, KV heads, per-task
    and mean accuracy (`report.task_metric`)."""
    from ..evaluation.report import task_metric

    data = json.loads(Path(path).read_text())
    if "results" not in data or "layout" not in data:
        raise BenchError(f"--eval-json {path}: needs a 'results' mapping and a 'layout'")
    layout = data["layout"]
    name = layout.get("name") if isinstance(layout, dict) else str(layout)
    acc = {t: a for t, m in data["results"].items() if isinstance(m, dict) and (a := task_metric(m)) is not None}
    if not acc:
        raise BenchError(f"--eval-json {path}: no task in 'results' has an 'acc' metric")
    heads = layout.get("kv_heads_total") if isinstance(layout, dict) else None
    return dict(path=str(path), layout=name, kv_heads_total=heads, accuracy=acc, mean=sum(acc.values()) / len(acc))


def accuracy_points(records: list[dict], evals: list[dict]) -> list[dict]:
    """Mean accuracy against KV cache bytes per sequence (context + new tokens), one point per
    evaluation. A layout's memory comes from the records of the same layout name, or else from the
    evaluation file's `kv_heads_total` with the records' head size and dtype."""
    per_seq = {r["layout"].upper(): r["kv_cache_bytes"] / r["batch_size"] for r in records}
    ref = records[0]
    tokens = ref["context"] + ref["new_tokens"]
    size = ref["kv_cache_bytes"] / ref["batch_size"] / (2 * tokens * ref["kv_heads_total"] * ref["head_dim"])
    points = []
    for e in evals:
        mem = per_seq.get(str(e["layout"]).upper())
        if mem is None and e["kv_heads_total"]:
            mem = 2 * tokens * e["kv_heads_total"] * ref["head_dim"] * size
        if mem is not None:
            points.append(
                dict(
                    layout=e["layout"],
                    kv_bytes_per_sequence=mem,
                    kv_bytes_per_token=mem / tokens,
                    mean_accuracy=e["mean"],
                    accuracy=e["accuracy"],
                    path=e["path"],
                )
            )
    return points


def plot_accuracy(points: list[dict], dtype: str, path: Path) -> None:
    """`report.plot_accuracy_vs_kv` (the report's plot, Pareto front marked) of `accuracy_points`."""
    from ..evaluation.report import pareto_front, plot_accuracy_vs_kv

    front = pareto_front([(p["kv_bytes_per_token"], p["mean_accuracy"]) for p in points])
    rows = [
        dict(
            label=p["layout"],
            layout=p["layout"],
            kv_bytes_per_token=p["kv_bytes_per_token"],
            average=p["mean_accuracy"],
            pareto=on,
            kv_dtype=dtype,
        )
        for p, on in zip(points, front)
    ]
    plot_accuracy_vs_kv(rows, path)


def write_report(records: list[dict], out: Path, eval_files: list[str] = ()) -> list[Path]:
    """results.json, summary.md and the plots (memory.png, throughput.png, accuracy.png with evals)."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "summary.md"]
    written[0].write_text(json.dumps(records, indent=1) + "\n")
    written[1].write_text(format_summary(summarize(records)) + "\n")
    if records:
        plot_memory(records, out / "memory.png")
        plot_throughput(records, out / "throughput.png")
        written += [out / "memory.png", out / "throughput.png"]
    if eval_files and records:
        points = accuracy_points(records, [read_eval(f) for f in eval_files])
        plot_accuracy(points, records[0]["dtype"], out / "accuracy.png")
        (out / "accuracy.json").write_text(json.dumps(points, indent=1) + "\n")
        written += [out / "accuracy.png", out / "accuracy.json"]
    return written


def latest(records: list[dict]) -> list[dict]:
    """One record per model, engine, context and batch size: a later record (a re-measured row)
    replaces an earlier one and takes its place at the end."""
    by_key = {}
    for r in records:
        key = (r["model"], r["engine"], r["context"], r["batch_size"])
        by_key.pop(key, None)
        by_key[key] = r
    return list(by_key.values())
