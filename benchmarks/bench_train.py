"""Training throughput on one GPU, side by side: our uptraining path against transformers' GPTNeoXForCausalLM,
both under the same DeepSpeed config (ZeRO-2, bf16 mixed precision) and micro-batch.

For each (shape, layout) it times optimizer steps of
    mlkv   `training.make_engine` on `MLKVTransformer` (compiled blocks, fused linear cross-entropy,
           each layer's parameters packed into two for DeepSpeed: `packing.pack_layers`)
    mlkv-unpacked  the same without the packing (to measure what it buys)
    mlkv-eager     the same without compiled layers
    mlkv-distill   `mlkv` distilled from a teacher (`--distill-from`): the shape's own model (MHA for
                   Pythia), frozen in bf16, its layers compiled; what distillation costs
    mlkv-fp8-tensorwise, mlkv-fp8-rowwise  `mlkv` with the blocks' linear layers in float8
                   (`uptrain.py --fp8 RECIPE`, torchao); `--precision-data PREFIX` compares their loss
                   curves with bf16's over `--precision-steps` batches of real packed rows
    hf     transformers' own class of the family (`GPTNeoXForCausalLM`, `LlamaForCausalLM`; SDPA
           attention) with the same optimizer (the base's layout only: transformers has no
           cross-layer KV sharing), eager, as users run it under DeepSpeed
    hf-compiled  the same with each layer compiled, as ours are: transformers at its best
The "vs transformers" ratio divides by the faster of the two transformers engines at that shape.
and reports tokens/s, MFU (6·N + 12·l·d·s FLOPs per token over the bf16 matrix rate measured in the
same run), peak memory and the share of step time spent waiting for data. A short loss curve of the
optimised path is compared with the eager path (no compile, full logits) from the same weights.

python benchmarks/bench_train.py --shapes pythia-1b,pythia-2.8b --layouts mha,mqa-12,mlkv-6 --max-micro-batch \
    --out benchmarks/results/train/h200.json
python benchmarks/bench_train.py --memory --shapes pythia-160m --seq-len 128 --micro-batch 160m=2 --out /tmp/m.json
python benchmarks/bench_train.py --shapes pythia-1b,pythia-2.8b --layouts mha --engines mlkv,mlkv-fp8-tensorwise,\
    mlkv-fp8-rowwise --precision-data data/rows2048 --out fp8.json

Run from the repository root (the default --ds-config is ds_configs/zero2.json). Results:
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from megatron_mlkv.config import MLKVConfig, preset
from megatron_mlkv.data import PackedDataset, Prefetcher, RowSampler, collate
from megatron_mlkv.training.engine import compile_blocks, make_engine
from megatron_mlkv.training.metrics import matmul_flops_per_s
from megatron_mlkv.training.trainer import single_process_env

# m and g as functions of l and h (named for Pythia-160M); "mha" is the shape's own layout (the base's
# GQA for the Llama family); gqa-48 needs h/3 to divide the base's K/V heads
LAYOUTS = {"mha": None, "gqa-48": ("l", "h/3"), "mqa-12": ("l", 1), "mlkv-6": ("l/2", 1), "mlkv-2": ("l/6", 1)}
# a layout name's suffix: the MLP widened to the base's parameter count, as convert.py does; `@matchedN`
# rounds that width to a multiple of N (`convert.py --mlp-multiple N`)
MATCHED = "@matched"
DEFAULT_MICRO = {"pythia-160m": 12, "pythia-410m": 16, "pythia-1b": 8, "llama-3.2-1b": 8, "smollm-135m": 12}
ENGINES = (
    "mlkv",
    "mlkv-unpacked",
    "mlkv-eager",
    "mlkv-distill",
    "mlkv-fp8-tensorwise",
    "mlkv-fp8-rowwise",
    "hf",
    "hf-compiled",
)
FP8 = "mlkv-fp8-"  # the engines of `uptrain.py --fp8 RECIPE`: "mlkv-fp8-tensorwise", "mlkv-fp8-rowwise"


def _split_layout(layout: str) -> tuple[str, int | None]:
    """'mlkv-6@matched64' -> ('mlkv-6', 64); '@matched' -> multiple 1; no suffix -> None (MHA's MLP
    width). ValueError for another suffix."""
    name, at, suffix = layout.partition("@")
    if not at:
        return name, None
    match = re.fullmatch(r"matched([1-9]\d*)?", suffix)
    if match is None:
        raise ValueError(f"{layout}: the suffix is {MATCHED} or {MATCHED}N")
    return name, int(match.group(1) or 1)


def known_layout(layout: str) -> bool:
    try:
        return _split_layout(layout)[0] in LAYOUTS
    except ValueError:
        return False


def layout_config(shape: str, layout: str) -> MLKVConfig:
    """The preset shape with one of `LAYOUTS` (m and g as functions of l and h), its MLP at the MHA
    width, or with the suffix `@matched` (`@matchedN`) widened as a converted checkpoint's
    (`target_config`, its width a multiple of N)."""
    base = preset(shape)
    layout, multiple = _split_layout(layout)
    if LAYOUTS[layout] is None:
        return base
    m, g = LAYOUTS[layout]
    value = {
        "l": base.num_layers,
        "l/2": base.num_layers // 2,
        "l/6": base.num_layers // 6,
        "h": base.num_heads,
        "h/3": base.num_heads // 3,
    }
    m, g = value.get(m, m), value.get(g, g)
    if multiple is not None:
        from megatron_mlkv.conversion import target_config

        return target_config(base, m, g, mlp_multiple=multiple)
    return base.with_layout(m, g)


class RandomRows:
    """A PackedDataset stand-in of random rows (same interface: `ds[i]`, `loss_mask`, `seq_len`)."""

    def __init__(self, rows: int, seq_len: int, vocab: int, seed: int = 0):
        self.tokens = np.random.default_rng(seed).integers(0, vocab, (rows, seq_len), dtype=np.uint16)
        self.seq_len = seq_len
        self._mask = np.ones(seq_len, dtype=bool)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i):
        return self.tokens[i]

    def loss_mask(self, i):
        return self._mask


DS_CONFIG = Path("ds_configs/zero2.json")  # as the user commands name it, from the repository root


def ds_config(micro_batch: int, path=DS_CONFIG) -> dict:
    cfg = json.loads(Path(path).read_text())
    cfg.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=1, train_batch_size=micro_batch)
    return cfg


class HFLoss(torch.nn.Module):
    """transformers' model and its own loss, as users run it under DeepSpeed (without a KV cache:
    transformers' default builds one in training, whose per-layer state recompiles compiled layers)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels):
        return self.model(input_ids=input_ids, labels=labels, use_cache=False).loss


def _hf_engine(config: MLKVConfig, cfg: dict, compiled: bool = False):
    """transformers' own class of the shape's family (`GPTNeoXForCausalLM`, `LlamaForCausalLM`) with SDPA
    attention, under the same DeepSpeed config and optimizer as ours."""
    import deepspeed
    from transformers import AutoModelForCausalLM

    from megatron_mlkv.conversion import base_config

    hf = AutoModelForCausalLM.from_config(base_config(config), attn_implementation="sdpa").cuda()
    if compiled:
        for layer in hf.base_model.layers:
            layer.forward = torch.compile(layer.forward)
    wrapped = HFLoss(hf)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01, fused=True)
    engine, _, _, _ = deepspeed.initialize(model=wrapped, optimizer=opt, config=cfg)
    return engine


def _mlkv_engine(
    config: MLKVConfig,
    cfg: dict,
    compiled: bool,
    loss: str,
    seed: int = 0,
    pack: bool = True,
    teacher: MLKVConfig | None = None,
    fp8: str | None = None,
):
    """Our engine; with `teacher` (the shape's base config), distilled from a random model of it, frozen
    in bf16 (the default A and T of `--distill-from`); with `fp8` (a recipe), the blocks' linear layers
    in float8 (`uptrain.py --fp8`)."""
    from megatron_mlkv.model import MLKVTransformer
    from megatron_mlkv.training.distill import Distillation
    from megatron_mlkv.training.float8 import to_float8

    torch.manual_seed(seed)
    model = MLKVTransformer(config).cuda()
    if fp8:
        to_float8(model, fp8)
    if compiled:
        compile_blocks(model)
    distill = None
    if teacher is not None:
        frozen = MLKVTransformer(teacher).to(device="cuda", dtype=torch.bfloat16).requires_grad_(False).eval()
        if compiled:
            compile_blocks(frozen)
        distill = Distillation(frozen)
    return make_engine(model, cfg, total_steps=1000, loss=loss, pack=pack, distill=distill)


def _engine(kind: str, config: MLKVConfig, cfg: dict, loss: str = "auto", base: MLKVConfig | None = None):
    """The engine `kind` names (see the module's docstring); `loss` for ours (`training.loss`), `base` the
    shape's own config (mlkv-distill's teacher)."""
    if kind.startswith("hf"):
        return _hf_engine(config, cfg, compiled=kind == "hf-compiled")
    return _mlkv_engine(
        config,
        cfg,
        compiled=kind != "mlkv-eager",
        loss=loss,
        pack=kind != "mlkv-unpacked",
        teacher=base if kind == "mlkv-distill" else None,
        fp8=kind.removeprefix(FP8) if kind.startswith(FP8) else None,
    )


def time_steps(engine, ds, micro: int, steps: int, warmup: int, device, summed: bool = True, window: int = 5) -> dict:
    """Run warmup + steps optimizer steps; time the last `steps`, and the data loading within them.
    `summed`: the engine returns the sum of token losses (ours), made a mean as transformers' is.

    The timed steps run in windows of `window` (the host waits for the GPU at each window's end).
    tokens/s comes from the median window's step time, which a passing stall of the host does not
    move (the 160M step is bound by the host); `tokens_per_s_mean` is over all timed steps."""
    sampler = RowSampler(len(ds), micro)
    batches = Prefetcher(lambda step: collate(ds, sampler.batch(step), device), warmup + steps)
    losses, data_wait, windows = [], 0.0, []
    torch.cuda.reset_peak_memory_stats(device)
    for step in range(warmup + steps):
        if step == warmup:
            torch.cuda.synchronize(device)
            start = mark = time.perf_counter()
            data_wait = 0.0
        t0 = time.perf_counter()
        batch = batches.get(step)
        ids, labels = batch["input_ids"], batch["labels"]
        data_wait += time.perf_counter() - t0
        loss = engine(ids, labels)
        if summed:
            loss = loss / (labels[:, 1:] != -100).sum()
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
        done = step + 1 - warmup  # timed steps done
        if done > 0 and (done % window == 0 or done == steps):
            torch.cuda.synchronize(device)
            now = time.perf_counter()
            windows.append((now - mark) / ((done - 1) % window + 1))
            mark = now
    elapsed = mark - start
    batches.close()
    step_time = float(np.median(windows))
    return {
        "step_time_s": step_time,
        "tokens_per_s": micro * ds.seq_len / step_time,
        "tokens_per_s_mean": micro * ds.seq_len * steps / elapsed,
        "window_step_times_s": windows,
        "data_wait_share": data_wait / elapsed,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device),
        "losses": [float(x) for x in losses],
    }


def single_gpu_process() -> torch.device:
    """This process as the one rank of a DeepSpeed world on GPU 0 (no launcher needed); its device."""
    single_process_env()
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    return device


def in_fresh_process(fn, *args):
    """fn(*args) in a new process, its result (or exception) returned here. Each measurement gets
    one: its CUDA memory starts empty and is all given back at exit. In one process, DeepSpeed
    engines and compiled graphs are not entirely freed, even after `engine.destroy()`,
    `torch._dynamo.reset()` and `gc.collect()` (on an H200, 13 GiB of a Pythia-1B engine stayed
    allocated), which added to the peak of whichever engine came next."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _matmul_rate() -> float:
    torch.backends.cuda.matmul.allow_tf32 = True
    return matmul_flops_per_s(torch.device("cuda", 0), torch.bfloat16)


def measure(
    kind: str,
    shape: str,
    layout: str,
    micro: int,
    seq_len: int,
    steps: int,
    warmup: int,
    ds_path=DS_CONFIG,
    search: bool = False,
    loss: str = "auto",
) -> dict:
    """One row of the table, in this process (run it through `in_fresh_process`): tokens/s and peak
    memory of `kind`'s engine, and with `search` the largest micro-batch (`largest_micro_batch`)."""
    device = single_gpu_process()
    torch.backends.cuda.matmul.allow_tf32 = True
    config, cfg = layout_config(shape, layout), ds_config(micro, ds_path)
    summed = not kind.startswith("hf")  # ours returns the sum of token losses, transformers the mean
    record = {
        "shape": shape,
        "layout": config.layout.name,
        "engine": kind,
        "micro_batch": micro,
        "seq_len": seq_len,
        "ds_config": Path(ds_path).name,
        "zero_stage": cfg.get("zero_optimization", {}).get("stage", 0),
        "precision": f"float8 {kind.removeprefix(FP8)} (blocks' linear layers), bf16 mixed"
        if kind.startswith(FP8)
        else "bf16 mixed",
        "loss": loss,
        "device": torch.cuda.get_device_name(device),
    }
    try:
        engine = _engine(kind, config, cfg, loss, base=layout_config(shape, "mha"))
        ds = RandomRows(micro * (warmup + steps), seq_len, config.vocab_size)
        record.update(time_steps(engine, ds, micro, steps, warmup, device, summed=summed))
        if search:
            record.update(largest_micro_batch(engine, config.vocab_size, seq_len, micro, device, summed))
    except torch.cuda.OutOfMemoryError:
        record["oom"] = True
    return record


def _step_peak(engine, vocab: int, micro: int, seq_len: int, device, summed: bool) -> tuple[int, int] | None:
    """(bytes allocated before, peak bytes during) one optimizer step at `micro`; None if out of memory."""
    ids = torch.randint(0, vocab, (micro, seq_len), device=device)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    try:
        loss = engine(ids, ids)
        engine.backward(loss / ids.numel() if summed else loss)
        engine.step()
        torch.cuda.synchronize(device)
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        loss = None
    return before, torch.cuda.max_memory_allocated(device)


def largest_micro_batch(engine, vocab: int, seq_len: int, micro: int, device, summed: bool = True) -> dict:
    """The largest micro-batch whose optimizer step runs on this device.

    Steps at micro/2 and micro give the memory at rest and per sequence (the peak grows linearly with
    the micro-batch); the micro-batch that line puts at the device's memory is tried, then one more
    while it fits, or one fewer while it does not. The line is close where activations set the peak
    (Pythia-1B at micro-batch 4-8: 62 predicted, 60 found) and too optimistic where they do not yet
    (2.8B at 2-4: 36 predicted, 19 found). A step that ran out of memory may leave the engine's
    gradient buckets partly filled; the searches above found their answer going down from there."""
    lo, hi = (micro // 2, micro) if micro > 1 else (1, 2)
    small = _step_peak(engine, vocab, lo, seq_len, device, summed)
    full = _step_peak(engine, vocab, hi, seq_len, device, summed)
    if small is None or full is None:
        return {"max_micro_batch": None}
    per_sequence = (full[1] - small[1]) / (hi - lo)
    fixed = full[1] - hi * per_sequence
    capacity = torch.cuda.mem_get_info(device)[1]
    b = max(micro, int((capacity * 0.97 - fixed) / per_sequence))
    fits = _step_peak(engine, vocab, b, seq_len, device, summed) is not None
    while fits and _step_peak(engine, vocab, b + 1, seq_len, device, summed) is not None:
        b += 1
    while not fits and b > micro:
        b -= 1
        fits = _step_peak(engine, vocab, b, seq_len, device, summed) is not None
    return {
        "max_micro_batch": b,
        "memory_at_rest_bytes": full[0],
        "activation_bytes_per_sequence": per_sequence,
        "peak_fixed_bytes": fixed,
        "device_memory_bytes": capacity,
    }


def run(
    shapes,
    layouts,
    micro: dict,
    seq_len: int = 2048,
    steps: int = 30,
    warmup: int = 8,
    engines=("mlkv", "hf", "hf-compiled"),
    out: str | None = None,
    loss_check_steps: int = 30,
    ds_path=DS_CONFIG,
    search: bool = False,
    loss: str = "auto",
) -> list[dict]:
    """The benchmark table (a list of records), printed and saved to `out` as JSON. Every
    measurement runs in a fresh process (`in_fresh_process`)."""
    peak = in_fresh_process(_matmul_rate)
    records = []
    for shape in shapes:
        b = micro[shape]
        for layout in layouts:
            config = layout_config(shape, layout)
            for kind in engines:
                if kind.startswith("hf") and layout != "mha":
                    continue
                record = in_fresh_process(
                    measure, kind, shape, layout, b, seq_len, steps, warmup, ds_path, search, loss
                )
                record["matmul_flops_per_s"] = peak
                if not record.get("oom"):
                    record["mfu"] = record["tokens_per_s"] * config.flops_per_token(seq_len) / peak
                records.append(record)
                _print_row(record)
    if loss_check_steps:
        records.append(loss_check(shapes[0], micro[shapes[0]], seq_len, loss_check_steps, ds_path))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(records, indent=2) + "\n")
    return records


def _loss_curve(shape: str, micro: int, seq_len: int, steps: int, compiled: bool, loss: str, ds_path) -> list[float]:
    device = single_gpu_process()
    config = layout_config(shape, "mlkv-6")
    ds = RandomRows(micro * steps, seq_len, config.vocab_size, seed=1)
    engine = _mlkv_engine(config, ds_config(micro, ds_path), compiled, loss, seed=0)
    return time_steps(engine, ds, micro, steps, 0, device)["losses"]


def loss_check(shape: str, micro: int, seq_len: int, steps: int, ds_path=DS_CONFIG) -> dict:
    """The loss curves of the optimised path under `ds_path` (compiled, fused loss) and of the eager
    path under ZeRO-2 (full logits), same weights and rows."""
    curves = {
        "eager": in_fresh_process(_loss_curve, shape, micro, seq_len, steps, False, "logits", DS_CONFIG),
        "optimised": in_fresh_process(_loss_curve, shape, micro, seq_len, steps, True, "auto", ds_path),
    }
    diff = max(abs(a - b) for a, b in zip(curves["eager"], curves["optimised"]))
    name = Path(ds_path).name
    print(f"loss check ({shape} MLKV, {steps} steps): max |eager ZeRO-2 - optimised {name}| = {diff:.4f}")
    return {
        "loss_check": True,
        "shape": shape,
        "layout": layout_config(shape, "mlkv-6").layout.name,
        "ds_config": name,
        "curves": curves,
        "max_abs_diff": diff,
    }


FP8_SETTLED = 50  # steps after which the float8 curves are compared with bf16's (the first are noisy)


def settled_difference(ref: list[float], curve: list[float], after: int = FP8_SETTLED) -> float:
    """The largest relative difference of `curve` to `ref` after step `after` (steps count from 1)."""
    return max(abs(b / a - 1) for a, b in zip(ref[after:], curve[after:]))


def _precision_curve(kind: str, shape: str, layout: str, micro: int, steps: int, data_prefix: str, ds_path) -> list:
    device = single_gpu_process()
    config = layout_config(shape, layout)
    ds = PackedDataset(data_prefix)
    ds.check_ids(np.arange(min(len(ds), micro * steps)), config.vocab_size)
    engine = _engine(kind, config, ds_config(micro, ds_path), base=layout_config(shape, "mha"))
    return time_steps(engine, ds, micro, steps, 0, device)["losses"]


def precision_check(
    shape: str, layout: str, micro: int, steps: int, data_prefix: str, recipes: list[str], ds_path=DS_CONFIG
) -> dict:
    """The loss curves of bf16 (`mlkv`) and of each float8 engine (`mlkv-fp8-RECIPE`) from the same
    weights over the same `steps` batches of real packed rows (`data_prefix`, in order), and the largest
    relative difference of each float8 curve to bf16's after step `FP8_SETTLED`."""
    kinds = ["mlkv", *(FP8 + r for r in recipes)]
    curves = {
        k: in_fresh_process(_precision_curve, k, shape, layout, micro, steps, data_prefix, ds_path) for k in kinds
    }
    diffs = {k: settled_difference(curves["mlkv"], curves[k]) for k in kinds[1:]}
    for kind, diff in diffs.items():
        print(f"precision check ({shape} {layout}, {steps} steps of {data_prefix}): {kind} within {diff:.2%} of bf16")
    return {
        "precision_check": True,
        "shape": shape,
        "layout": layout_config(shape, layout).layout.name,
        "data": str(data_prefix),
        "micro_batch": micro,
        "curves": curves,
        "settled_after": FP8_SETTLED,
        "max_rel_diff": diffs,
    }


def plot_precision(check: dict, path: Path) -> Path:
    """The precision check's curves (PNG): loss against step, and each float8 curve's relative
    difference to bf16's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_diff) = plt.subplots(1, 2, figsize=(13, 4.5))
    ref = np.array(check["curves"]["mlkv"])
    for kind, curve in check["curves"].items():
        label = "bf16" if kind == "mlkv" else kind.removeprefix(FP8) + " float8"
        ax_loss.plot(np.arange(1, len(curve) + 1), curve, label=label)
        if kind != "mlkv":
            ax_diff.plot(np.arange(1, len(curve) + 1), np.array(curve) / ref - 1, label=label)
    ax_diff.axvline(check["settled_after"], color="grey", linestyle=":")
    ax_loss.set(xlabel="step", ylabel="training loss", title=f"{check['shape']} {check['layout']}: real packed text")
    ax_diff.set(xlabel="step", ylabel="float8 / bf16 - 1", title="relative difference to bf16")
    for ax in (ax_loss, ax_diff):
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def profile(shape: str, layout: str, micro: int, seq_len: int = 2048, steps: int = 4, kind: str = "mlkv") -> str:
    """torch.profiler table of a few steps (after warm-up): where a step's time goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    device = single_gpu_process()
    config = layout_config(shape, layout)
    ds = RandomRows(micro * (steps + 6), seq_len, config.vocab_size)
    engine = _engine(kind, config, ds_config(micro))
    time_steps(engine, ds, micro, 1, 5, device, summed=not kind.startswith("hf"))
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        time_steps(engine, ds, micro, steps, 0, device, summed=not kind.startswith("hf"))
    table = prof.key_averages()
    return "\n".join(
        table.table(sort_by=key, row_limit=rows, max_name_column_width=60)
        for key, rows in (("self_cuda_time_total", 30), ("self_cpu_time_total", 20))
    )


def _memory_kind(t: torch.Tensor, config: MLKVConfig, seq_len: int) -> str:
    """What a tensor saved for backward is, from its shape."""
    shape = tuple(t.shape)
    if t.dim() == 4 and shape[-2:] == (seq_len, seq_len):
        return "attention scores (s x s)"
    if t.dim() == 4:
        return "attention q/k/v/output (b, heads, s, d)"
    if t.dim() >= 2 and shape[-1] >= config.vocab_size:
        return "logits"
    last = shape[-1] if shape else 0
    if last == config.hidden_size:
        return "hidden states (b, s, d)"
    if last == config.intermediate_size:
        return "MLP (b, s, intermediate)"
    return "other (projections, norms' statistics, ids)"


def saved_memory(
    config: MLKVConfig, micro: int, seq_len: int, device: torch.device, dtype: torch.dtype, loss: str = "auto"
) -> dict:
    """What one training forward keeps for its backward, by kind (`_memory_kind`), in bytes: every
    tensor autograd saves, each storage counted once, the weights left out (eager: compiled code
    saves its tensors out of the hooks' sight). On CUDA also the peak allocated above the weights
    over forward and backward, eager and with the layers compiled as training compiles them
    (`train.compile_blocks`). Weights in `dtype`, as DeepSpeed's bf16 module holds them; no optimizer."""
    from megatron_mlkv.model import MLKVTransformer
    from megatron_mlkv.training.loss import lm_loss_sum

    torch.manual_seed(0)
    model = MLKVTransformer(config).to(device=device, dtype=dtype)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids = torch.randint(0, config.vocab_size, (micro, seq_len), device=device)
    kinds, seen = {}, set()

    def pack(t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in weights and key not in seen:
            seen.add(key)
            kind = _memory_kind(t, config, seq_len)
            kinds[kind] = kinds.get(kind, 0) + storage.nbytes()
        return t

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        total = lm_loss_sum(model, ids, ids, loss)
    total.backward()
    record = {
        "layout": config.layout.name,
        "kv_heads": config.layout.kv_heads_total(),
        "micro_batch": micro,
        "seq_len": seq_len,
        "dtype": str(dtype).removeprefix("torch."),
        "loss": loss,
        "saved_bytes": kinds,
        "saved_total_bytes": sum(kinds.values()),
        "peak_above_weights_bytes": (torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None),
        "peak_compiled_above_weights_bytes": None,
    }
    del total
    if device.type == "cuda":
        model.zero_grad(set_to_none=True)
        compile_blocks(model)
        for _ in range(2):  # the first call compiles; the second is measured
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            lm_loss_sum(model, ids, ids, loss).backward()
            model.zero_grad(set_to_none=True)
        record["peak_compiled_above_weights_bytes"] = torch.cuda.max_memory_allocated(device) - base
    del model
    gc.collect()
    return record


def format_memory(records: list[dict]) -> str:
    """Markdown: saved bytes by kind per layout (GiB), and the total against the first row's."""
    kinds = sorted({k for r in records for k in r["saved_bytes"]})
    lines = [
        "| shape | layout | micro-batch | "
        + " | ".join(kinds)
        + " | saved in all | vs first | peak above weights | compiled: peak above weights |",
        "|---" * (len(kinds) + 7) + "|",
    ]
    first = records[0]["saved_total_bytes"] if records else 1
    for r in records:
        cells = [f"{r['saved_bytes'].get(k, 0) / 2**30:.2f}" for k in kinds]
        peaks = [
            "" if r.get(key) is None else f"{r[key] / 2**30:.1f} GiB"
            for key in ("peak_above_weights_bytes", "peak_compiled_above_weights_bytes")
        ]
        lines.append(
            f"| {r.get('shape', '')} | {r['layout']} | {r['micro_batch']} | "
            + " | ".join(cells)
            + f" | {r['saved_total_bytes'] / 2**30:.2f} GiB | {r['saved_total_bytes'] / first:.2f}x | "
            + " | ".join(peaks)
            + " |"
        )
    return "\n".join(lines)


def _print_row(r: dict) -> None:
    if r.get("oom"):
        print(f"{r['shape']:12s} {r['layout']:8s} {r['engine']:5s} b={r['micro_batch']:3d}  OOM", flush=True)
        return
    print(
        f"{r['shape']:12s} {r['layout']:8s} {r['engine']:5s} b={r['micro_batch']:3d} "
        f"{r['tokens_per_s']:>10,.0f} tok/s  MFU {r['mfu']:6.1%}  peak {r['peak_memory_bytes'] / 2**30:5.1f} GiB  "
        f"data wait {r['data_wait_share']:.2%}",
        flush=True,
    )


def format_table(records: list[dict]) -> str:
    """Markdown: one row per measurement, with the speed-up over the faster transformers engine at the
    same shape."""
    base = {}
    for r in records:
        if r.get("engine", "").startswith("hf") and not r.get("oom"):
            base[r["shape"]] = max(base.get(r["shape"], 0.0), r["tokens_per_s"])
    lines = [
        "| shape | layout | engine | micro-batch | tokens/s | MFU | peak memory | data wait | vs transformers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if r.get("loss_check") or r.get("precision_check"):
            continue
        if r.get("oom"):
            lines.append(f"| {r['shape']} | {r['layout']} | {r['engine']} | {r['micro_batch']} | OOM | | | | |")
            continue
        ratio = f"{r['tokens_per_s'] / base[r['shape']]:.2f}x" if r["shape"] in base else ""
        lines.append(
            f"| {r['shape']} | {r['layout']} | {r['engine']} | {r['micro_batch']} | {r['tokens_per_s']:,.0f} | "
            f"{r['mfu']:.1%} | {r['peak_memory_bytes'] / 2**30:.1f} GiB | {r['data_wait_share']:.2%} | {ratio} |"
        )
    return "\n".join(lines)


def format_distill_cost(records: list[dict]) -> str:
    """Markdown: what distillation costs per shape and layout, `mlkv-distill` against `mlkv`."""
    plain = {(r["shape"], r["layout"]): r for r in records if r.get("engine") == "mlkv" and not r.get("oom")}
    lines = [
        "| shape | layout | micro-batch | tokens/s | distilled | distilled / plain | peak memory | distilled |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        p = plain.get((r.get("shape"), r.get("layout")))
        if r.get("engine") != "mlkv-distill" or p is None or r.get("oom"):
            continue
        lines.append(
            f"| {r['shape']} | {r['layout']} | {r['micro_batch']} | {p['tokens_per_s']:,.0f} | "
            f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / p['tokens_per_s']:.2f}x | "
            f"{p['peak_memory_bytes'] / 2**30:.1f} GiB | {r['peak_memory_bytes'] / 2**30:.1f} GiB |"
        )
    return "\n".join(lines) if len(lines) > 2 else ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--shapes",
        default="pythia-160m,pythia-410m,pythia-1b",
        help="presets (config.preset: pythia-*, llama-3.2-1b, smollm-135m), comma-separated",
    )
    p.add_argument(
        "--layouts",
        default="mha,mqa-12,mlkv-6",
        help=f"comma-separated, from {', '.join(LAYOUTS)}; a suffix {MATCHED} widens the MLP as convert.py does, "
        f"{MATCHED}N to a multiple of N (convert.py --mlp-multiple N)",
    )
    p.add_argument(
        "--micro-batch",
        action="append",
        default=[],
        metavar="SHAPE=B",
        help="micro-batch per shape (default 160m 12, 410m 16, 1b 8)",
    )
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=30, help="timed steps per measurement (in windows of 5)")
    p.add_argument("--warmup", type=int, default=8, help="untimed steps first (compilation, allocator)")
    p.add_argument("--engines", default="mlkv,hf,hf-compiled", help=f"comma-separated, from {', '.join(ENGINES)}")
    p.add_argument("--loss-check-steps", type=int, default=30, help="steps of the eager-vs-optimised loss curve")
    p.add_argument("--ds-config", help="DeepSpeed config for both engines (default ds_configs/zero2.json)")
    p.add_argument(
        "--loss",
        choices=("auto", "fused", "chunked", "logits"),
        default="auto",
        help="our engines' loss (training.loss)",
    )
    p.add_argument(
        "--max-micro-batch",
        action="store_true",
        help="also find the largest micro-batch each engine fits on this GPU (and its memory at rest and per sequence)",
    )
    p.add_argument(
        "--profile", action="store_true", help="print a torch.profiler table for the first shape/layout instead"
    )
    p.add_argument(
        "--memory",
        action="store_true",
        help="instead: what a training forward saves for backward, by kind, per shape and layout "
        "(and the peak on a GPU); runs on the CPU too",
    )
    p.add_argument(
        "--precision-data",
        metavar="PREFIX",
        help="also compare the loss curves of bf16 and float8 (the fp8 engines of --engines, else both "
        "recipes) on these packed rows, first shape and layout (JSON, and OUT_precision.png)",
    )
    p.add_argument("--precision-steps", type=int, default=200, help="steps of that comparison (default 200)")
    p.add_argument("--out", default="bench_train.json", help="JSON output")
    args = p.parse_args(argv)
    micro = dict(DEFAULT_MICRO)
    for item in args.micro_batch:
        shape, _, value = item.partition("=")
        micro[shape if shape in DEFAULT_MICRO or "-" in shape else f"pythia-{shape}"] = int(value)
    if args.memory:
        return memory_mode(args, micro)
    ds_path = Path(args.ds_config or DS_CONFIG)
    if not ds_path.is_file():
        print(
            f"error: --ds-config {ds_path} not found; run from the repository root or pass --ds-config FILE",
            file=sys.stderr,
        )
        return 2
    if not torch.cuda.is_available():
        print("error: bench_train.py measures GPU throughput; no CUDA device found", file=sys.stderr)
        return 2
    shapes = args.shapes.split(",")
    unknown = [l for l in args.layouts.split(",") if not known_layout(l)]
    if unknown:
        print(f"error: --layouts {','.join(unknown)} unknown; allowed: {', '.join(LAYOUTS)}", file=sys.stderr)
        return 2
    unknown = [e for e in args.engines.split(",") if e not in ENGINES]
    if unknown:
        print(f"error: --engines {','.join(unknown)} unknown; allowed: {', '.join(ENGINES)}", file=sys.stderr)
        return 2
    if args.profile:
        shape, layout = shapes[0], args.layouts.split(",")[0]
        print(profile(shape, layout, micro[shape], args.seq_len, kind=args.engines.split(",")[0]))
        return 0
    records = run(
        shapes,
        args.layouts.split(","),
        micro,
        args.seq_len,
        args.steps,
        args.warmup,
        tuple(args.engines.split(",")),
        args.out,
        args.loss_check_steps,
        ds_path,
        args.max_micro_batch,
        args.loss,
    )
    if args.precision_data:
        from megatron_mlkv.training.float8 import RECIPES

        engines = args.engines.split(",")
        recipes = [e.removeprefix(FP8) for e in engines if e.startswith(FP8)] or list(RECIPES)
        shape, layout = shapes[0], args.layouts.split(",")[0]
        check = precision_check(
            shape, layout, micro[shape], args.precision_steps, args.precision_data, recipes, ds_path
        )
        records.append(check)
        out = Path(args.out)
        out.write_text(json.dumps(records, indent=2) + "\n")
        plot_precision(check, out.with_name(out.stem + "_precision.png"))
    print(format_table(records))
    cost = format_distill_cost(records)
    if cost:
        print("\nDistillation (mlkv-distill against mlkv):\n" + cost)
    return 0


def memory_mode(args, micro: dict) -> int:
    """--memory: `bench_train.saved_memory` per shape and layout, a table, and OUT_memory.json."""

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    records = []
    for shape in args.shapes.split(","):
        for layout in args.layouts.split(","):
            record = saved_memory(layout_config(shape, layout), micro.get(shape, 1), args.seq_len, device, dtype)
            records.append({"shape": shape, **record})
            print(format_memory(records[-1:]), flush=True)
    print(format_memory(records))
    out = Path(args.out).with_name(Path(args.out).stem + "_memory.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
