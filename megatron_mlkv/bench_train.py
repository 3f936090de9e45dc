"""Training throughput, side by side: our uptraining path against transformers' GPTNeoXForCausalLM,
both under the same DeepSpeed config (ZeRO-2, bf16 mixed precision) and micro-batch.

For each (shape, layout) it times optimizer steps of
    mlkv   `train.make_engine` on `MLKVTransformer` (compiled blocks, fused linear cross-entropy,
           each layer's parameters packed into two for DeepSpeed: `packing.pack_layers`)
    mlkv-unpacked  the same without the packing (to measure what it buys)
    hf     transformers' `GPTNeoXForCausalLM` (SDPA attention) with the same optimizer (MHA only:
           transformers has no cross-layer KV sharing)
and reports tokens/s, MFU (6·N + 12·l·d·s FLOPs per token over the bf16 matrix rate measured in the
same run), peak memory and the share of step time spent waiting for data. A short loss curve of the
optimised path is compared with the eager path (no compile, full logits) from the same weights.
"""

from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from .config import MLKVConfig, preset
from .data import Prefetcher, RowSampler, collate
from .train import compile_blocks, make_engine, matmul_flops_per_s

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {"mha": None, "gqa-48": ("l", "h/3"), "mqa-12": ("l", 1), "mlkv-6": ("l/2", 1), "mlkv-2": ("l/6", 1)}
DEFAULT_MICRO = {"pythia-160m": 12, "pythia-410m": 16, "pythia-1b": 8}
ENGINES = ("mlkv", "mlkv-unpacked", "hf")


def layout_config(shape: str, layout: str) -> MLKVConfig:
    """The preset shape with one of `LAYOUTS` (m and g as functions of l and h)."""
    base = preset(shape)
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
    return base.with_layout(value.get(m, m), value.get(g, g))


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


DS_CONFIG = ROOT / "ds_configs" / "zero2.json"


def ds_config(micro_batch: int) -> dict:
    cfg = json.loads(Path(DS_CONFIG).read_text())
    cfg.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=1, train_batch_size=micro_batch)
    return cfg


class HFLoss(torch.nn.Module):
    """transformers' model and its own loss, as users run it under DeepSpeed."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels):
        return self.model(input_ids=input_ids, labels=labels).loss


def _hf_engine(config: MLKVConfig, cfg: dict):
    import deepspeed
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    kwargs = {k: v for k, v in config.to_hf_kwargs().items() if k not in ("num_kv_heads", "kv_owner")}
    hf = GPTNeoXForCausalLM(GPTNeoXConfig(**kwargs, attn_implementation="sdpa")).cuda()
    wrapped = HFLoss(hf)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01, fused=True)
    engine, _, _, _ = deepspeed.initialize(model=wrapped, optimizer=opt, config=cfg)
    return engine


def _mlkv_engine(config: MLKVConfig, cfg: dict, compiled: bool, loss: str, seed: int = 0, pack: bool = True):
    from .model import MLKVTransformer

    torch.manual_seed(seed)
    model = MLKVTransformer(config).cuda()
    if compiled:
        compile_blocks(model)
    return make_engine(model, cfg, total_steps=1000, loss=loss, pack=pack)


def _engine(kind: str, config: MLKVConfig, cfg: dict):
    """The engine `kind` names: "hf", "mlkv" or "mlkv-unpacked" (see the module's docstring)."""
    if kind == "hf":
        return _hf_engine(config, cfg)
    return _mlkv_engine(config, cfg, compiled=True, loss="auto", pack=kind == "mlkv")


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


def _release(engine) -> None:
    """Free an engine's GPU memory before the next measurement (engines hold optimizer states,
    gradient buckets and compiled graphs)."""
    if engine is not None and hasattr(engine, "destroy"):
        engine.destroy()
    del engine
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def single_gpu_process(master_port: str = "29511") -> torch.device:
    """This process as the one rank of a DeepSpeed world on GPU 0 (no launcher needed); its device."""
    for key, value in dict(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=master_port
    ).items():
        os.environ.setdefault(key, value)
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    return device


def run(
    shapes,
    layouts,
    micro: dict,
    seq_len: int = 2048,
    steps: int = 30,
    warmup: int = 8,
    engines=("mlkv", "hf"),
    out: str | None = None,
    loss_check_steps: int = 30,
) -> list[dict]:
    """The benchmark table (a list of records), printed and saved to `out` as JSON."""
    device = single_gpu_process()
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = matmul_flops_per_s(device, torch.bfloat16)
    records = []
    for shape in shapes:
        b = micro[shape]
        for layout in layouts:
            config = layout_config(shape, layout)
            ds = RandomRows(b * (warmup + steps), seq_len, config.vocab_size)
            for kind in engines:
                if kind == "hf" and layout != "mha":
                    continue
                record = {
                    "shape": shape,
                    "layout": config.layout.name,
                    "engine": kind,
                    "micro_batch": b,
                    "seq_len": seq_len,
                    "ds_config": str(DS_CONFIG),
                    "precision": "bf16 mixed",
                    "device": torch.cuda.get_device_name(device),
                    "matmul_flops_per_s": peak,
                }
                engine = None
                try:
                    engine = _engine(kind, config, ds_config(b))
                    record.update(time_steps(engine, ds, b, steps, warmup, device, summed=kind != "hf"))
                    record["mfu"] = record["tokens_per_s"] * config.flops_per_token(seq_len) / peak
                except torch.cuda.OutOfMemoryError:
                    record["oom"] = True
                engine = _release(engine)
                records.append(record)
                _print_row(record)
    if loss_check_steps:
        records.append(loss_check(shapes[0], micro[shapes[0]], seq_len, loss_check_steps, device))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(records, indent=2) + "\n")
    return records


def loss_check(shape: str, micro: int, seq_len: int, steps: int, device) -> dict:
    """The optimised path (compiled, fused loss) and the eager path (full logits), same weights and
    rows: their loss curves."""
    config = layout_config(shape, "mlkv-6")
    ds = RandomRows(micro * steps, seq_len, config.vocab_size, seed=1)
    curves = {}
    for name, compiled, loss in (("eager", False, "logits"), ("optimised", True, "auto")):
        engine = _mlkv_engine(config, ds_config(micro), compiled, loss, seed=0)
        curves[name] = time_steps(engine, ds, micro, steps, 0, device)["losses"]
        engine = _release(engine)
    diff = max(abs(a - b) for a, b in zip(curves["eager"], curves["optimised"]))
    print(f"loss check ({shape} MLKV-6, {steps} steps): max |eager - optimised| = {diff:.4f}")
    return {"loss_check": True, "shape": shape, "layout": config.layout.name, "curves": curves, "max_abs_diff": diff}


def profile(shape: str, layout: str, micro: int, seq_len: int = 2048, steps: int = 4, kind: str = "mlkv") -> str:
    """torch.profiler table of a few steps (after warm-up): where a step's time goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    device = single_gpu_process()
    config = layout_config(shape, layout)
    ds = RandomRows(micro * (steps + 6), seq_len, config.vocab_size)
    engine = _engine(kind, config, ds_config(micro))
    time_steps(engine, ds, micro, 1, 5, device, summed=kind != "hf")
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        time_steps(engine, ds, micro, steps, 0, device, summed=kind != "hf")
    _release(engine)
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
    from .loss import lm_loss_sum
    from .model import MLKVTransformer

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
    """Markdown: one row per measurement, with the speed-up over transformers at the same shape."""
    base = {r["shape"]: r["tokens_per_s"] for r in records if r.get("engine") == "hf" and not r.get("oom")}
    lines = [
        "| shape | layout | engine | micro-batch | tokens/s | MFU | peak memory | data wait | vs transformers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if r.get("loss_check"):
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
