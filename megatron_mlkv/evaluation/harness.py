"""lm-evaluation-harness on one checkpoint: accuracy per task plus the KV layout and cache cost.

`evaluate_checkpoint` runs `lm_eval.simple_evaluate` with lm-eval's own `HFLM` on a transformers
folder (remote code trusted), so its numbers are the ones `lm-eval --model hf --model_args
pretrained=DIR,trust_remote_code=True` prints. The uptraining loop calls `try_evaluate_checkpoint` on
rank 0 after each export and logs `eval_scalars(result)` to TensorBoard; `launch/evaluate.py` is the
command line. lm-eval is imported lazily: it is the `eval` extra, and slow to import.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..config import MLKVConfig
from ..conversion.reference import FORMAT, is_reference_config, reference_config
from ..errors import MLKVError, first_line
from ..integrity import write_json_atomic

DEFAULT_TASKS = ("arc_easy", "lambada_openai", "piqa", "sciq")
DTYPES = ("auto", "float32", "bfloat16", "float16")  # what the model computes in; 'auto': the checkpoint's own
KV_DTYPE = "fp16"  # the cache dtype KV bytes per token are reported in (the paper's inference setting)
HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")


class EvaluationError(MLKVError):
    """Bad evaluation input (model folder, task name, include path); the message names it."""


def default_device() -> str:
    """'cuda' when a GPU is visible, else 'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """'a,b' or ['a', 'b'] -> ['a', 'b'] (blanks dropped, order kept)."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [t.strip() for t in names if t and t.strip()]
    if not names:
        raise EvaluationError("no tasks given; e.g. --tasks " + ",".join(DEFAULT_TASKS))
    return names


def read_model_config(model: str | os.PathLike, revision: str | None = None) -> tuple[MLKVConfig, bool]:
    """The `MLKVConfig` (shape and KV layout) of a transformers folder or hub name, and whether it is a
    checkpoint of the MLKV paper's reference code (`conversion.reference`); or EvaluationError."""
    from transformers import AutoConfig

    path = Path(model)
    if not path.is_dir() and not HUB_NAME.match(str(model)):
        raise EvaluationError(
            f"model folder {model} does not exist; expected a folder written by "
            f"launch/convert.py or the uptraining export (RUN_DIR/hf/step_N)"
        )
    if path.is_dir() and not (path / "config.json").is_file():
        raise EvaluationError(f"{model} has no config.json; expected a transformers folder")
    if path.is_dir() and revision is not None:
        raise EvaluationError(f"{model}: --revision applies to hub names, not to a local folder")
    try:
        hf_config = AutoConfig.from_pretrained(str(model), revision=revision, trust_remote_code=True)
        if is_reference_config(hf_config):
            return reference_config(hf_config, str(model)), True
        return MLKVConfig.from_hf(hf_config), False
    except MLKVError as e:
        raise EvaluationError(str(e)) from None
    except Exception as e:  # hub errors, a damaged config, a model that is not GPT-NeoX-like
        raise EvaluationError(f"cannot read the model config of {model}: {first_line(e)}") from None


def layout_summary(config: MLKVConfig) -> dict:
    """The layout facts a result carries: name, m, g, owner map, KV heads and bytes per token."""
    return {
        "layout": config.layout.to_dict(),
        "head_dim": config.head_dim,
        "num_parameters": config.num_parameters(),
        "kv_dtype": KV_DTYPE,
        "kv_bytes_per_token": config.layout.kv_bytes_per_token(config.head_dim, KV_DTYPE),
    }


def make_task_manager(tasks: Sequence[str], include_path: str | os.PathLike | None = None):
    """lm-eval's `TaskManager` (built-in tasks plus `include_path`), after checking every task exists."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise EvaluationError(f"include path {include_path} is not a folder; give a folder of lm-eval task YAMLs")
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    known = set(manager.all_tasks)
    for name in tasks:
        if name not in known and not Path(name).is_file():
            where = (
                f"lm-eval's tasks or {include_path}" if include_path else "lm-eval's tasks (no --include-path given)"
            )
            raise EvaluationError(f"unknown task '{name}': not in {where}; list them with `lm-eval ls tasks`")
    return manager


def evaluate_checkpoint(
    model_dir: str | os.PathLike,
    tasks: str | Sequence[str] = DEFAULT_TASKS,
    include_path: str | os.PathLike | None = None,
    limit: int | float | None = None,
    batch_size: int | str = 8,
    out_path: str | os.PathLike | None = None,
    device: str | None = None,
    dtype: str = "auto",
    revision: str | None = None,
) -> dict:
    """Evaluate one checkpoint with lm-eval and return (and write to `out_path`) the result dict.

    The dict holds lm-eval's `results` (task -> {'acc,none': ..., ...}), `higher_is_better`,
    `n-samples`, `versions`, `n-shot` and `config`, plus the model's `layout` (name, m, g, owner map)
    and `kv_bytes_per_token`. `limit` caps documents per task (a fraction if < 1); `batch_size` may be
    'auto'; `device` defaults to `default_device()`; `dtype` (one of DTYPES) is what the model computes
    in, 'auto' (lm-eval's default) the checkpoint's own; `revision` the hub revision of a hub name. A
    checkpoint of the MLKV paper's reference code is converted in memory (its result says `format`).
    The caller's random states are left as they were (lm-eval reseeds them). Raises EvaluationError for
    a missing model or unknown task; lm-eval's and datasets' own errors (e.g. data that cannot be
    downloaded) propagate.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import handle_non_serializable

    config, reference = read_model_config(model_dir, revision)
    names = parse_tasks(tasks)
    manager = make_task_manager(names, include_path)
    device = device or default_device()
    model = lm = None
    with _preserved_rng():
        try:
            # The model is loaded here, not by HFLM from the path: HFLM would then start an accelerate
            # Accelerator, which under a distributed training launcher sees WORLD_SIZE > 1 and waits
            # for ranks that are not evaluating. The load is the one HFLM does (`dtype`, remote code).
            model = _load_model(model_dir, device, dtype, revision, reference)
            loaded_dtype = str(model.dtype).removeprefix("torch.")
            with _quiet("lm_eval.models.huggingface"):  # its warnings about being passed a loaded model
                lm = HFLM(pretrained=model, batch_size=batch_size, trust_remote_code=True, revision=revision or "main")
            output = lm_eval.simple_evaluate(
                model=lm, tasks=names, task_manager=manager, limit=limit, device=device, log_samples=False
            )
        finally:
            del lm, model  # free the accelerator memory for training, also after a failure
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    if output is None:
        raise EvaluationError("lm-eval returned no results: call it on local rank 0 only")
    result = {
        "model": str(model_dir),
        "step": _step_of(model_dir),
        "revision": revision,
        "format": FORMAT if reference else "mlkv",
        "tasks": names,
        **layout_summary(config),
        **{
            k: output[k]
            for k in (
                "results",
                "higher_is_better",
                "n-samples",
                "versions",
                "n-shot",
                "config",
                "lm_eval_version",
                "date",
            )
            if k in output
        },
    }
    result["config"] = {
        **result.get("config", {}),
        "model": str(model_dir),
        "device": device,
        "dtype": loaded_dtype,
        "include_path": str(include_path) if include_path is not None else None,
    }
    result = json.loads(json.dumps(result, default=handle_non_serializable))
    if out_path is not None:
        write_json_atomic(out_path, result)
    return result


def try_evaluate_checkpoint(
    model_dir: str | os.PathLike, tasks: str | Sequence[str] = DEFAULT_TASKS, **kwargs
) -> tuple[dict | None, str | None]:
    """`evaluate_checkpoint` that never raises (for the training hook): (result, None) on success,
    (None, one-line reason) on any failure. Nothing is written to `out_path` on failure."""
    try:
        return evaluate_checkpoint(model_dir, tasks, **kwargs), None
    except Exception as e:  # an evaluation failure must be reported, not end the training run
        return None, format_error(e)


def format_error(e: BaseException) -> str:
    """One line for a failed evaluation: the message, prefixed by the exception type unless it is ours."""
    return first_line(e) if isinstance(e, EvaluationError) else f"{type(e).__name__}: {first_line(e)}"


def eval_scalars(result: dict) -> dict[str, float]:
    """lm-eval results -> TensorBoard scalars `eval/<task>/<metric>`, e.g. 'eval/arc_easy/acc'.

    lm-eval keys are 'metric,filter'; the default filter 'none' is dropped, others become
    '<metric>_<filter>'. Standard errors and non-numeric values are skipped.
    """
    scalars = {}
    for task, metrics in result["results"].items():
        for key, value in metrics.items():
            metric, sep, filt = key.partition(",")
            if not sep or metric.endswith("_stderr") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name = metric if filt == "none" else f"{metric}_{filt}"
            scalars[f"eval/{task}/{name}"] = float(value)
    return scalars


def format_results(result: dict) -> str:
    """A markdown table of one result: task, metric, value, stderr, then the layout line."""
    lines = ["| task | metric | value | stderr |", "|---|---|---|---|"]
    for task, metrics in result["results"].items():
        for key, value in metrics.items():
            metric, sep, filt = key.partition(",")
            if not sep or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            stderr = f"{stderr:.4f}" if isinstance(stderr, (int, float)) else "-"
            name = metric if filt == "none" else f"{metric} ({filt})"
            lines.append(f"| {task} | {name} | {value:.4f} | {stderr} |")
    layout = result["layout"]
    lines.append(
        f"\nlayout {layout['name']} (m={layout['kv_layers']}, g={layout['num_kv_heads']}, "
        f"owners {layout['kv_owner']}): {layout['kv_heads_total']} KV heads, "
        f"{result['kv_bytes_per_token']:,} KV bytes/token ({result['kv_dtype']})"
    )
    return "\n".join(lines)


def _load_model(
    model: str | os.PathLike, device: str, dtype: str = "auto", revision: str | None = None, reference: bool = False
) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise EvaluationError(f"--dtype {dtype}: allowed {', '.join(DTYPES)}")
    if reference:  # transformers would read it as GPT-NeoX with random attention
        from ..conversion import load_base_model

        loaded = load_base_model(str(model), revision, None if dtype == "auto" else getattr(torch, dtype))
        return loaded.to(device)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(model),
        dtype=dtype if dtype == "auto" else getattr(torch, dtype),
        revision=revision,
        trust_remote_code=True,
    )
    return loaded.to(device).eval()


@contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextmanager
def _preserved_rng() -> Iterator[None]:
    """Restore the python, numpy and torch (CPU and CUDA) random states on exit."""
    py, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


def _step_of(model_dir: str | os.PathLike) -> int | None:
    """N for a training export folder `.../step_N`, else None."""
    match = re.fullmatch(r"step_(\d+)", Path(model_dir).name)
    return int(match.group(1)) if match else None


def _validation_batches(ds, batch: int, rows: int | None, device):
    """(input_ids, the targets of positions :-1 with -100 on padding) of the first `rows` rows of `ds`."""
    from ..data import collate

    n = len(ds) if rows is None else min(rows, len(ds))
    for start in range(0, n, batch):
        b = collate(ds, np.arange(start, min(n, start + batch)), device)
        yield b["input_ids"], b["labels"][:, 1:]


@torch.no_grad()
def validation_loss(logits_fn, ds, batch: int = 16, rows: int | None = None, device=None) -> float:
    """Mean next-token loss over the first `rows` rows of `ds` (all by default; real tokens only) for
    `logits_fn(ids) -> logits`, the rows collated onto `device`."""
    total, count = 0.0, 0
    for ids, labels in _validation_batches(ds, batch, rows, device):
        logits = logits_fn(ids)[:, :-1].float()
        total += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
        ).item()
        count += int((labels != -100).sum())
    return total / count


@torch.no_grad()
def validation_kl(logits_fn, reference_fn, ds, batch: int = 16, rows: int | None = None, device=None) -> float:
    """Mean KL(reference || model) over the real next-token positions of the first `rows` rows of `ds`,
    at temperature 1: how far `logits_fn`'s model is from `reference_fn`'s (a distillation's teacher)."""
    from ..parallel import vocab_parallel_distillation

    total, count = 0.0, 0
    for ids, labels in _validation_batches(ds, batch, rows, device):
        logits, reference = logits_fn(ids)[:, :-1], reference_fn(ids)[:, :-1]
        _, kl = vocab_parallel_distillation(logits.flatten(0, 1), reference.flatten(0, 1), labels.flatten())
        total += kl.sum().item()
        count += int((labels != -100).sum())
    return total / count
