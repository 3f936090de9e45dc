"""Pythia-160M (or --shape), micro-batch 12, ZeRO-2 bf16 (bench_train's setup and timing), in one run:
what the host costs a step, and what takes it off. Variants:

    layer              each layer compiled on its own (`train.compile_blocks`, the default)
    layer-cudagraphs   the same, each compiled layer also captured in CUDA graphs
                       (torch.compile mode="reduce-overhead")
    stack              `hidden_states` compiled as one graph: embedding, every layer (with the packed
                       parameters' per-layer views), final norm
    stack-cudagraphs   the same, captured in CUDA graphs (the packed parameters are the graphs' own
                       inputs, at fixed addresses: nothing to copy in)
    loop               `run_layers` compiled as one graph: every layer with its views, the embedding,
                       rotary tables and final norm outside (compiled in, as in `stack`, the rotary
                       tables were recomputed inside every layer's kernels)
    loop-cudagraphs    the same, captured in CUDA graphs
    *-liger            the loss through liger's own autograd function (its backward synchronises
                       the host) instead of `loss.FusedLinearCrossEntropy`
    *-cudnn            SDPA's flash and memory-efficient backends off, so attention runs on cuDNN
    *-cppwrapper       inductor's C++ wrapper (`cpp_wrapper`): the compiled graphs launch their
                       kernels from C++ instead of Python
    *-dsnorm           DeepSpeed's own gradient norm (float64) instead of `train.float32_grad_norm`'s
    *-ds-nosync        with DeepSpeed's two synchronising gradient-norm helpers replaced by
                       equivalents that do not synchronise (an experiment only: DeepSpeed's code;
                       since `train.float32_grad_norm`, only the clipping's check is left to replace)
    hf                 transformers, for the ratio

For each: tokens/s, MFU, the first losses (same seed: the variants should agree), the GPU's busy
time per step (kernels and copies, from a profile of 3 more steps) against the step time, the 60
longest kernels, and the host synchronisations of one step (torch.cuda.set_sync_debug_mode) with
where they come from.

PYTHONPATH=. python benchmarks/results/train/compile_modes.py [--variants layer,stack,hf] [--layout mha] [--shape pythia-160m]
    [--micro-batch 12] [--seq-len 2048] [--trace DIR] [--out FILE.json]
"""
import argparse
import collections
import json
import os
import traceback
import warnings

import torch
import torch._inductor.config

from benchmarks import bench_train
from megatron_mlkv.training import loss
from megatron_mlkv.model import MLKVTransformer
from megatron_mlkv.training.engine import make_engine
from megatron_mlkv.training.metrics import matmul_flops_per_s

ORIGINAL_APPLY = loss.FusedLinearCrossEntropy.apply


def liger_autograd(hidden, weight, targets):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    return liger_fused_linear_cross_entropy(hidden, weight, targets, ignore_index=-100, reduction="sum",
                                            chunk_mem_const=loss.FUSED_CHUNK_MEM).float()


def patch_deepspeed_norms() -> None:
    """DeepSpeed's ZeRO-1/2 gradient norm: `mask_nan_or_inf_with_val_inplace` copies a -1 from the host
    (a synchronising copy) and `unscale_and_clip_grads` asks `is_invalid_grad_norm` on the host."""
    import deepspeed.runtime.zero.stage_1_and_2 as zero

    def mask(norm, device=None, val=-1.0):
        norm.masked_fill_(~torch.isfinite(norm), val)

    zero.mask_nan_or_inf_with_val_inplace = mask
    zero.is_invalid_grad_norm = lambda norm: False  # bf16, overflow check off: only clipping asks


def engine(variant: str, config, cfg: dict):
    for backend in ("flash", "mem_efficient"):  # chosen when the compiled layers are traced
        getattr(torch.backends.cuda, f"enable_{backend}_sdp")("-cudnn" not in variant)
    torch._inductor.config.cpp_wrapper = "-cppwrapper" in variant  # also when the backward compiles
    if variant == "hf":
        return bench_train._hf_engine(config, cfg)
    torch.manual_seed(0)
    model = MLKVTransformer(config).cuda()
    mode = "reduce-overhead" if "cudagraphs" in variant else None
    if variant.startswith("layer"):
        for block in model.layers:  # as train.compile_blocks
            block.forward = torch.compile(block.forward, mode=mode)
    elif variant.startswith("loop"):
        model.run_layers = torch.compile(model.run_layers, mode=mode)
    else:
        model.hidden_states = torch.compile(model.hidden_states, mode=mode)
    loss.FusedLinearCrossEntropy.apply = liger_autograd if variant.endswith("-liger") else ORIGINAL_APPLY
    if variant.endswith("-ds-nosync"):
        patch_deepspeed_norms()  # for the rest of the process: run this variant last
    e = make_engine(model, cfg, total_steps=1000)
    if "-dsnorm" in variant:
        del e.optimizer.get_grad_norm_direct  # the instance's own: back to DeepSpeed's method
    return e


def trace(e, ds, micro: int, device, summed: bool, path: str, steps: int = 2) -> None:
    """A chrome trace (CPU ops with their Python stacks, and GPU kernels) of `steps` steps."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        bench_train.time_steps(e, ds, micro, steps, 0, device, summed=summed)
    prof.export_chrome_trace(path)


def gpu_busy_per_step(e, ds, micro: int, device, summed: bool, steps: int = 3) -> tuple[float, dict]:
    """Seconds per step during which the GPU runs a kernel or a copy (union of their intervals), and
    the 60 longest kernels' names with their seconds per step."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        bench_train.time_steps(e, ds, micro, steps, 0, device, summed=summed)
    events = [ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA]
    busy, end = 0.0, float("-inf")
    for a, b in sorted((ev.time_range.start, ev.time_range.end) for ev in events):
        if b > end:
            busy += b - max(a, end)
            end = b
    kernels = collections.Counter()
    for ev in events:
        kernels[ev.name[:100]] += ev.time_range.elapsed_us() / steps / 1e6
    return busy / steps / 1e6, dict(kernels.most_common(60))


def attention_kernels(kernels: dict) -> dict:
    return {k: v for k, v in kernels.items()
            if any(word in k.lower() for word in ("flash", "fmha", "attn", "attention", "cudnn"))}


def host_syncs(e, ds, micro: int, device, summed: bool) -> dict:
    """Synchronising CUDA calls of one step, counted by where they are made."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            bench_train.time_steps(e, ds, micro, 1, 0, device, summed=summed)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    where = collections.Counter(f"{os.path.basename(w.filename)}:{w.lineno}" for w in caught
                                if "synchronizing" in str(w.message))
    return dict(where)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default="layer,stack,stack-cudagraphs,stack-liger,hf,stack-ds-nosync")
    p.add_argument("--layout", default="mha", choices=sorted(bench_train.LAYOUTS))
    p.add_argument("--shape", default="pythia-160m")
    p.add_argument("--micro-batch", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=2048, help="1 and 64 leave the GPU almost idle: the step's host time")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--out")
    p.add_argument("--trace", metavar="DIR", help="also save a chrome trace of two steps per variant there")
    args = p.parse_args()
    device = bench_train.single_gpu_process()
    peak = matmul_flops_per_s(device, torch.bfloat16)
    micro, seq = args.micro_batch, args.seq_len
    config = bench_train.layout_config(args.shape, args.layout)
    ds = bench_train.RandomRows(micro * (args.warmup + args.steps), seq, config.vocab_size)
    records = []
    for variant in args.variants.split(","):
        record = dict(variant=variant, shape=args.shape, layout=config.layout.name, micro_batch=micro, seq_len=seq,
                      device=torch.cuda.get_device_name(device), matmul_flops_per_s=peak)
        e, summed = None, variant != "hf"
        try:
            e = engine(variant, config, bench_train.ds_config(micro))
            record.update(bench_train.time_steps(e, ds, micro, args.steps, args.warmup, device, summed=summed))
            record["mfu"] = record["tokens_per_s"] * config.flops_per_token(seq) / peak
            record["gpu_busy_s_per_step"], record["kernels"] = gpu_busy_per_step(e, ds, micro, device, summed)
            record["gpu_busy_share"] = record["gpu_busy_s_per_step"] / record["step_time_s"]
            record["host_syncs"] = host_syncs(e, ds, micro, device, summed)
            if args.trace:
                trace(e, ds, micro, device, summed, os.path.join(args.trace, f"{variant}.json.gz"))
            print(f"{variant:18s} {record['tokens_per_s']:10,.0f} tokens/s  MFU {record['mfu']:.1%}  "
                  f"step {record['step_time_s'] * 1e3:.1f} ms, GPU busy {record['gpu_busy_s_per_step'] * 1e3:.1f} ms "
                  f"({record['gpu_busy_share']:.0%})  peak {record['peak_memory_bytes'] / 2**30:.1f} GiB  "
                  f"syncs {sum(record['host_syncs'].values())} {record['host_syncs']}  losses {record['losses'][:3]}  "
                  f"attention {[(k[:40], round(v * 1e3, 2)) for k, v in attention_kernels(record['kernels']).items()]}",
                  flush=True)
        except Exception as exc:  # noqa: BLE001 - an experiment: a variant that fails is a result
            record["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            traceback.print_exc(limit=-6)
        if e is not None:  # not entirely freed in-process; bench_train.py now measures in fresh processes
            e.destroy()
        e = None
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        records.append(record)
        if args.out:  # after each variant: a run stopped at its time limit keeps what it measured
            with open(args.out, "w") as f:
                json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
