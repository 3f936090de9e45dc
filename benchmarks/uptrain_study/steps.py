"""The uptraining study on real text (benchmarks/uptrain_study/run.sh): the parts no user command does.

A corpus of the Python sources installed on the machine (no network), a next-line multiple-choice
task for lm-eval built from its held-out packages, the pre-training of the multi-head base (it plays
the part of a Pythia checkpoint, which comes from elsewhere), and the study's table and loss plot.
Conversion, uptraining, evaluation and the Pareto report are the user commands themselves.
"""

from __future__ import annotations

import json
import math
import random
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import xxhash

NEXT_LINE_YAML = """task: next_line
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


# --------------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------------


def source_roots() -> list[Path]:
    """The folders of installed Python code: the standard library and every site-packages on the path."""
    paths = sysconfig.get_paths()
    roots = [paths["stdlib"], paths["purelib"], paths["platlib"]]
    roots += [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    out = []
    for root in roots:
        root = Path(root).resolve()
        if root.is_dir() and root not in out and not any(root.is_relative_to(o) for o in out):
            out.append(root)
    return out


def _package(root: Path, path: Path) -> str:
    """The top-level package (or stdlib module) a file belongs to: the unit of the train/valid split."""
    return f"{root.name}/{path.relative_to(root).parts[0].removesuffix('.py')}"


def build_corpus(
    out_dir: str | Path,
    roots: list[Path] | None = None,
    valid_share: float = 0.05,
    max_mb: float | None = None,
    min_bytes: int = 200,
    max_bytes: int = 1 << 20,
    seed: int = 0,
) -> dict:
    """Write `train.jsonl` and `valid.jsonl` ({"text", "package", "path"} per source file) and `corpus.json`.

    Files are deduplicated by content (XXH3); files under `min_bytes` or over `max_bytes` (generated
    tables) and undecodable ones are left out. Whole packages go to validation, the smallest-hashed
    first, until it holds `valid_share` of the bytes (none larger than twice the target), so no
    package is on both sides. Training files are shuffled with `seed`; `max_mb` caps the training text
    (millions of characters) and the validation text in proportion."""
    roots = roots or source_roots()
    seen, by_package = set(), {}
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            try:
                if path.is_symlink() or not min_bytes <= path.stat().st_size <= max_bytes:
                    continue
                raw = path.read_bytes()
                text = raw.decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            digest = xxhash.xxh3_64_intdigest(raw)
            if digest in seen or not text.strip():
                continue
            seen.add(digest)
            by_package.setdefault(_package(root, path), []).append({"text": text, "path": str(path)})
    sizes = {p: sum(len(d["text"]) for d in docs) for p, docs in by_package.items()}
    total = sum(sizes.values())
    target, valid = valid_share * total, set()
    for package in sorted(by_package, key=lambda p: xxhash.xxh3_64_intdigest(f"{seed}:{p}".encode())):
        if sum(sizes[p] for p in valid) >= target:
            break
        if sizes[package] <= 2 * target:
            valid.add(package)
    splits = {"train": [], "valid": []}
    for package in sorted(by_package):
        for doc in by_package[package]:
            splits["valid" if package in valid else "train"].append({**doc, "package": package})
    random.Random(seed).shuffle(splits["train"])
    if max_mb is not None:  # the validation split keeps its share of the smaller corpus
        for name, cap in (("train", max_mb * 1e6), ("valid", max_mb * 1e6 * valid_share / (1 - valid_share))):
            kept, size = [], 0
            for doc in splits[name]:
                if size >= cap:
                    break
                kept.append(doc)
                size += len(doc["text"])
            splits[name] = kept
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, docs in splits.items():
        tmp = out / f".{name}.jsonl.tmp"
        with open(tmp, "w") as f:
            for doc in docs:
                f.write(json.dumps(doc) + "\n")
        tmp.replace(out / f"{name}.jsonl")
    stats = {
        "roots": [str(r) for r in roots],
        "distinct_files": len(seen),
        "packages": {k: len({d["package"] for d in v}) for k, v in splits.items()},
        "characters": {k: sum(len(d["text"]) for d in v) for k, v in splits.items()},
        "documents": {k: len(v) for k, v in splits.items()},
        "valid_packages": sorted(valid),
    }
    (out / "corpus.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


# --------------------------------------------------------------------------------------------------
# The next-line task
# --------------------------------------------------------------------------------------------------


def _candidate(line: str) -> bool:
    s = line.strip()
    return len(s) >= 12 and not s.startswith("#")


def next_line_docs(valid_jsonl: str | Path, n: int = 1000, context_lines: int = 12, seed: int = 0) -> list[dict]:
    """`n` questions: `context_lines` lines of a held-out file, then the true next line among four
    choices (the other three: lines of other held-out files), at `n` distinct places. Only lines of
    12+ characters that are not comments and do not occur in their context are asked for."""
    files = [json.loads(line) for line in open(valid_jsonl)]
    lines = [f["text"].splitlines() for f in files]
    pool = [(i, ln) for i, ls in enumerate(lines) for ln in ls if _candidate(ln)]
    places = [
        (i, at)
        for i, ls in enumerate(lines)
        for at in range(context_lines, len(ls))
        if _candidate(ls[at]) and ls[at] not in ls[at - context_lines : at]
    ]
    if len({j for j, _ in pool}) < 2:
        raise ValueError(f"{valid_jsonl}: the wrong choices come from other files; it has lines of one file only")
    if len(places) < n:
        raise ValueError(f"{valid_jsonl}: only {len(places)} questions can be made, {n} asked for")
    rng = random.Random(seed)
    docs = []
    for i, at in rng.sample(places, n):
        target = lines[i][at]
        others = set()
        while len(others) < 3:
            j, line = rng.choice(pool)
            if j != i and line != target:
                others.add(line)
        choices = [target, *sorted(others)]
        rng.shuffle(choices)
        docs.append(
            {
                "context": "\n".join(lines[i][at - context_lines : at]) + "\n",
                "choices": choices,
                "label": choices.index(target),
            }
        )
    return docs


def write_next_line_task(valid_jsonl: str | Path, out_dir: str | Path, n: int = 1000, seed: int = 0) -> Path:
    """The lm-eval task `next_line` (YAML + jsonl) in `out_dir`, for `--eval-include-path out_dir`."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "next_line.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in next_line_docs(valid_jsonl, n, seed=seed)))
    (out / "next_line.yaml").write_text(NEXT_LINE_YAML.format(data=data))
    return out


# --------------------------------------------------------------------------------------------------
# Pre-training the base
# --------------------------------------------------------------------------------------------------


def pretrain_base(
    data_prefix: str,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    tokens: int,
    hidden: int,
    layers: int,
    heads: int,
    batch_rows: int,
    lr: float = 1e-3,
    warmup_steps: int = 200,
    minutes: float | None = None,
    seed: int = 0,
    log_every: int = 20,
) -> dict:
    """Pre-train a transformers `GPTNeoXForCausalLM` (Pythia's architecture) from scratch on `tokens`
    tokens of the packed data (fewer if `minutes` runs out first: the step count is fixed after
    timing steps 10-30, inside the warm-up): AdamW (0.9, 0.95), weight decay 0.01, clipping
    1.0, `warmup_steps` of linear warm-up, then cosine decay to 10%; bf16 autocast on a GPU. Writes
    the folder, with `pretrain.jsonl` (the loss every `log_every` steps) and `pretrain_summary.json`."""
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    from megatron_mlkv.data import PackedDataset, collate

    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ds, tok = PackedDataset(data_prefix), AutoTokenizer.from_pretrained(tokenizer_dir)
    config = GPTNeoXConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=ds.seq_len,
        rotary_pct=0.25,
        use_parallel_residual=True,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    model = GPTNeoXForCausalLM(config).to(device)
    tokens_per_step = batch_rows * ds.seq_len
    warmup_steps = min(warmup_steps, max(40, tokens // tokens_per_step // 10))
    plan = {"steps": max(warmup_steps + 1, tokens // tokens_per_step)}
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=device.type == "cuda",
    )

    def factor(s):
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        return 0.1 + 0.9 * 0.5 * (
            1 + math.cos(math.pi * min(1.0, (s - warmup_steps) / max(1, plan["steps"] - warmup_steps)))
        )

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    order = np.random.default_rng(seed).permutation(len(ds))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "pretrain.jsonl", "w")
    bar = tqdm(total=plan["steps"], desc="pre-train base", unit="step", mininterval=5)
    start, step, loss_value = time.perf_counter(), 0, float("nan")
    while step < plan["steps"]:
        rows = order[(step * batch_rows + np.arange(batch_rows)) % len(ds)]
        batch = collate(ds, rows, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        step += 1
        bar.update()
        if step in (10, 30) and minutes is not None:  # steps 10-30 time a step; the warm-up is not over yet
            loss.item()
            if step == 10:
                timed_from = time.perf_counter()
            else:
                per_step = (time.perf_counter() - timed_from) / 20
                left = minutes * 60 - (time.perf_counter() - start)
                plan["steps"] = max(warmup_steps + 1, min(plan["steps"], step + int(left / per_step)))
                bar.total = plan["steps"]
        if step % log_every == 0 or step == plan["steps"]:
            loss_value = loss.item()
            log.write(json.dumps({"step": step, "tokens": step * tokens_per_step, "loss": loss_value}) + "\n")
            log.flush()
    seconds = time.perf_counter() - start
    bar.close()
    log.close()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    summary = {
        "steps": step,
        "tokens": step * tokens_per_step,
        "seconds": seconds,
        "tokens_per_s": step * tokens_per_step / seconds,
        "last_loss": loss_value,
        "parameters": sum(p.numel() for p in model.parameters()),
        "hidden": hidden,
        "layers": layers,
        "heads": heads,
        "seq_len": ds.seq_len,
        "batch_rows": batch_rows,
        "lr": lr,
        "train_rows": len(ds),
        "epochs": step * batch_rows / len(ds),
    }
    (out / "pretrain_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


VALID_ROWS = 512  # the validation rows of every loss in the study (and uptrain.py --valid-rows)


def _logits_fn(model_dir: str | Path, device):
    """`ids -> logits` of a transformers folder (a GPT-NeoX base or one of ours) in float32, whatever the
    folder's dtype, so losses compare exactly."""
    import torch

    from megatron_mlkv.loading import load_pretrained

    return load_pretrained(model_dir, dtype=torch.float32).to(device).eval()


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def validation_loss(model_dir: str | Path, data_prefix: str, rows: int = VALID_ROWS, batch_rows: int = 32) -> float:
    """The mean next-token loss of a model folder over the first `rows` rows of a packed prefix."""
    from megatron_mlkv.data import PackedDataset
    from megatron_mlkv.evaluation.harness import validation_loss as pack_loss

    device = _device()
    return pack_loss(_logits_fn(model_dir, device), PackedDataset(data_prefix), batch_rows, rows, device)


def validation_kl(
    model_dir: str | Path, base_dir: str | Path, data_prefix: str, rows: int = VALID_ROWS, batch_rows: int = 32
) -> float:
    """The mean KL(base || model) at temperature 1 over the same rows: how far a model is from its base."""
    from megatron_mlkv.data import PackedDataset
    from megatron_mlkv.evaluation.harness import validation_kl as pack_kl

    device = _device()
    fns = (_logits_fn(model_dir, device), _logits_fn(base_dir, device))
    return pack_kl(*fns, PackedDataset(data_prefix), batch_rows, rows, device)


# --------------------------------------------------------------------------------------------------
# Runs: token budgets, DeepSpeed config, the sweep's choice
# --------------------------------------------------------------------------------------------------


def budget(out_dir: str | Path, percent: float, micro: int, seq: int) -> tuple[int, int]:
    """(tokens, save interval) of a run on `percent`% of the base's pre-training tokens: checkpoints at
    half-way and at the end."""
    tokens = int(json.loads((Path(out_dir) / "base" / "pretrain_summary.json").read_text())["tokens"] * percent / 100)
    return tokens, max(1, (math.ceil(tokens / (micro * seq)) + 1) // 2)


def study_ds_config(src: str | Path, dst: str | Path, micro: int) -> Path:
    """The shipped DeepSpeed config with the study's micro-batch."""
    cfg = json.loads(Path(src).read_text())
    cfg["train_micro_batch_size_per_gpu"] = micro
    Path(dst).write_text(json.dumps(cfg, indent=2) + "\n")
    return Path(dst)


def sweep_run(weight: str, temperature: str) -> str:
    return f"mlkv-6-kd-a{weight}-t{temperature}"


def best_sweep(out_dir: str | Path, grid: list[str]) -> str:
    """The "A:T" of `grid` whose MLKV-6 run ended with the lowest validation loss (held-out rows, not the
    task the study reports)."""

    def final(point: str) -> float:
        records = _records(Path(out_dir) / "runs" / sweep_run(*point.split(":")) / "metrics.jsonl")
        return [r["valid_loss"] for r in records if "valid_loss" in r][-1]

    return min(grid, key=final)


def record_time(out_dir: str | Path, stage: str, seconds: float) -> None:
    path = Path(out_dir) / "times.json"
    times = json.loads(path.read_text()) if path.exists() else {}
    times[stage] = seconds
    path.write_text(json.dumps(times, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def train_curve(records: list[dict]) -> list[tuple[int, float]]:
    """(step, training cross-entropy) of a run's logged steps: of a distilled run its `ce`, not its
    `loss` (the objective, mostly the KL to the teacher), so that every run's curve is comparable."""
    return [(r["step"], r.get("ce", r["loss"])) for r in records if "loss" in r]


def budget_percent(run: str) -> float:
    """The share of the base's tokens a run was given (run.sh): P for `NAME-tokensP`, else 5."""
    head, _, percent = run.rpartition("-tokens")
    return float(percent) if head else 5.0


def _recipe(config: dict) -> str:
    if not config.get("distill_from"):
        return "plain"
    return f"distilled (A={config['distill_weight']:g}, T={config['distill_temperature']:g})"


def summarize(out_dir: str | Path, task: str = "next_line") -> dict:
    """Collect the study under `out_dir` (see run.sh's layout) into `results.json`, `results.md` (the
    tables and each stage's wall time), `loss_curves.png` and `budget.png`; returns the results.

    Every run's validation loss and KL to the base (temperature 1) are computed here on the same 512
    held-out rows in float32, for plain and distilled runs alike."""
    out = Path(out_dir)
    valid = str(out / "data" / "valid")
    base = json.loads((out / "base" / "pretrain_summary.json").read_text())
    base["valid_loss"] = validation_loss(out / "base", valid)
    rows = []
    for run in sorted(p for p in (out / "runs").iterdir() if (p / "run_config.json").is_file()):
        config = json.loads((run / "run_config.json").read_text())
        steps = config["total_steps"]
        export = run / "hf" / f"step_{steps}"
        if not (export / "config.json").is_file():
            continue  # not finished
        init = Path(config["init"])
        report = json.loads((init / "conversion_report.json").read_text())
        result = run / "eval" / f"step_{steps}.json"  # absent if the evaluation failed: no accuracy
        evaluation = json.loads(result.read_text())["results"].get(task, {}) if result.is_file() else {}
        train = [r for r in _records(run / "metrics.jsonl") if "loss" in r]
        tokens = steps * config["global_batch"] * config["seq_len"]
        rows.append(
            {
                "run": run.name,
                "layout": report["layout"],
                "kv_heads": report["kv_heads"]["after"],
                "parameters": report["parameters"]["after"],
                "kv_bytes_per_token_fp16": report["kv_bytes_per_token"]["float16"]["after"],
                "init": report.get("init", "converted"),
                "merge": report["merge"],
                "mlp_init": report["mlp_init"],
                "recipe": _recipe(config),
                "distill_weight": config.get("distill_weight"),
                "distill_temperature": config.get("distill_temperature"),
                "loss_converted": validation_loss(init, valid),
                "loss_uptrained": validation_loss(export, valid),
                "kl_to_base": validation_kl(export, out / "base", valid),
                "acc": evaluation.get("acc,none"),
                "acc_norm": evaluation.get("acc_norm,none"),
                "uptrain_steps": steps,
                "uptrain_tokens": tokens,
                "budget_percent": budget_percent(run.name),
                "tokens_per_s": float(np.median([r["tokens_per_s"] for r in train[1:]] or [float("nan")])),
                "train_loss": train_curve(train),
            }
        )
    times = json.loads((out / "times.json").read_text()) if (out / "times.json").is_file() else {}
    results = {"base": base, "runs": rows, "stage_seconds": times}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(format_results(results) + "\n")
    plot_curves(out, results)
    plot_budget(out, results)
    return results


def _cell(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def control_acc(results: dict) -> float | None:
    """The next-line accuracy of the MHA control (the base converted to itself, uptrained on 5%)."""
    return next((r["acc"] for r in results["runs"] if r["run"] == "mha"), None)


def format_results(results: dict) -> str:
    """The study's tables: every run on 5% of the base's tokens; the sweep of A and T; the budget curve."""
    base, control = results["base"], control_acc(results)
    recovered = lambda r: "" if not control or r["acc"] is None else f"{r['acc'] / control:.0%}"  # noqa: E731
    lines = [
        f"Base: GPT-NeoX MHA, {base['layers']} layers, {base['heads']} heads, width {base['hidden']}, "
        f"{base['parameters']:,} parameters, pre-trained on {base['tokens']:,} tokens "
        f"({base['tokens_per_s']:,.0f} tokens/s); validation loss {base['valid_loss']:.4f}.",
        "",
        "| run | layout | recipe | KV heads | KV bytes/token (fp16) | loss after conversion | "
        "loss after uptraining | KL to the base | next-line acc | acc_norm | of the control's acc |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    five = [r for r in results["runs"] if r["budget_percent"] == 5.0 and not r["run"].startswith("mlkv-6-kd-a")]
    for r in sorted(five, key=lambda r: (-r["kv_heads"], r["run"])):
        lines.append(
            f"| {r['run']} | {r['layout']} | {r['recipe']} | {r['kv_heads']} | {r['kv_bytes_per_token_fp16']:,} | "
            f"{r['loss_converted']:.4f} | {r['loss_uptrained']:.4f} | {r['kl_to_base']:.4f} | "
            f"{_cell(r['acc'], '.3f')} | {_cell(r['acc_norm'], '.3f')} | {recovered(r)} |"
        )
    sweep = [r for r in results["runs"] if r["run"].startswith("mlkv-6-kd-a")]
    if sweep:
        lines += [
            "",
            "Sweep at MLKV-6, 5% of the base's tokens (chosen by the lowest validation loss):",
            "",
            "| A | T | loss after uptraining | KL to the base | next-line acc | acc_norm |",
            "|---|---|---|---|---|---|",
        ]
        for r in sorted(sweep, key=lambda r: (r["distill_weight"], r["distill_temperature"])):
            lines.append(
                f"| {r['distill_weight']:g} | {r['distill_temperature']:g} | {r['loss_uptrained']:.4f} | "
                f"{r['kl_to_base']:.4f} | {_cell(r['acc'], '.3f')} | {_cell(r['acc_norm'], '.3f')} |"
            )
    curve = budget_curve(results)
    if any(len(points) > 1 for points in curve.values()):
        lines += [
            "",
            "MLKV-6 by token budget:",
            "",
            "| % of the base's tokens | recipe | uptraining tokens | loss after uptraining | KL to the base | "
            "next-line acc | of the control's acc |",
            "|---|---|---|---|---|---|---|",
        ]
        for recipe, points in curve.items():
            for r in points:
                lines.append(
                    f"| {r['budget_percent']:g} | {recipe} | {r['uptrain_tokens']:,} | "
                    f"{r['loss_uptrained']:.4f} | {r['kl_to_base']:.4f} | {_cell(r['acc'], '.3f')} | {recovered(r)} |"
                )
    if results["stage_seconds"]:
        lines += ["", "| stage | wall time (s) |", "|---|---|"]
        lines += [f"| {k} | {v:.0f} |" for k, v in results["stage_seconds"].items()]
    return "\n".join(lines)


def budget_curve(results: dict) -> dict[str, list[dict]]:
    """MLKV-6's runs by recipe ("plain", "distilled"), in order of tokens: `mlkv-6` and the `-tokensP`
    runs, and for the distilled recipe the `-kd-tokensP` runs and the sweep's run with their A and T."""
    mlkv6 = [r for r in results["runs"] if r["layout"] == "MLKV-6" and r["run"].startswith("mlkv-6")]
    plain = [r for r in mlkv6 if r["run"] == "mlkv-6" or r["run"].startswith("mlkv-6-tokens")]
    distilled = [r for r in mlkv6 if r["run"].startswith("mlkv-6-kd-tokens")]
    chosen = {(r["distill_weight"], r["distill_temperature"]) for r in distilled}
    distilled += [
        r
        for r in mlkv6
        if r["run"].startswith("mlkv-6-kd-a") and (r["distill_weight"], r["distill_temperature"]) in chosen
    ]
    return {k: sorted(v, key=lambda r: r["uptrain_tokens"]) for k, v in (("plain", plain), ("distilled", distilled))}


def plot_budget(out: Path, results: dict) -> Path | None:
    """MLKV-6 against its uptraining tokens, plain and distilled: next-line accuracy (the MHA control as
    a line) and validation loss."""
    curve = budget_curve(results)
    if not any(curve.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 5))
    control = next((r for r in results["runs"] if r["run"] == "mha"), None)
    for recipe, marker in (("plain", "o"), ("distilled", "s")):
        points = curve[recipe]
        scored = [r for r in points if r["acc"] is not None]
        ax_acc.plot([r["budget_percent"] for r in scored], [r["acc"] for r in scored], marker=marker, label=recipe)
        ax_loss.plot(
            [r["budget_percent"] for r in points], [r["loss_uptrained"] for r in points], marker=marker, label=recipe
        )
    if control is not None:
        for ax, key in ((ax_acc, "acc"), (ax_loss, "loss_uptrained")):
            if control[key] is not None:
                ax.axhline(control[key], color="grey", linestyle="--", label="MHA control (5%)")
    budgets = sorted({r["budget_percent"] for points in curve.values() for r in points})
    for ax, label in ((ax_acc, "next-line accuracy"), (ax_loss, "validation loss")):
        ax.set_xscale("log")
        ax.set_xticks(budgets)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())  # the log scale's own labels would sit between the budgets
        ax.set(xlabel="uptraining tokens (% of the base's pre-training tokens)", ylabel=label)
        ax.legend()
    fig.suptitle("MLKV-6: what uptraining recovers, plain and distilled from the base")
    path = out / "budget.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(out: Path, results: dict) -> Path:
    """Training cross-entropy against step for every uptraining run at 5% (one panel), and the base's
    pre-training beside it where its log is at hand (a results folder copied without it: one panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pre_log = out / "base" / "pretrain.jsonl"
    if pre_log.is_file():
        fig, (ax_pre, ax_up) = plt.subplots(1, 2, figsize=(15, 5))
        pre = _records(pre_log)
        ax_pre.plot([r["tokens"] / 1e6 for r in pre], [r["loss"] for r in pre])
        ax_pre.set(xlabel="tokens (millions)", ylabel="training loss", title="pre-training the MHA base")
    else:
        fig, ax_up = plt.subplots(figsize=(10, 5))
    five = [r for r in results["runs"] if r["budget_percent"] == 5.0 and not r["run"].startswith("mlkv-6-kd-a")]
    runs = sorted(five, key=lambda r: (-r["kv_heads"], r["run"]))  # legend from most KV to least
    layouts = list(dict.fromkeys(r["layout"] for r in runs))  # one colour a layout, its variants dashed
    palette = plt.cm.tab10(np.arange(len(layouts)) % 10)
    for r in runs:
        color = palette[layouts.index(r["layout"])]
        steps, losses = zip(*r["train_loss"]) if r["train_loss"] else ((), ())
        ablation = r["init"] != "converted" or r["merge"] != "mean" or r["mlp_init"] != "zero" or r["recipe"] != "plain"
        ax_up.plot(
            steps,
            losses,
            color=color,
            label=f"{r['run']} ({r['kv_heads']} KV heads)",
            linestyle="--" if ablation else "-",
        )
    ax_up.set(xlabel="step", ylabel="training cross-entropy", title="uptraining (5% of the base's tokens)")
    ax_up.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the curves, not over them
    path = out / "loss_curves.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
