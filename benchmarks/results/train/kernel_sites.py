"""Which operation launches each of the GPU's non-matrix kernels in a training step: bench_train's
`mlkv` engine (ZeRO-2, bf16 mixed precision), one profile of 2 steps, kernels summed per step by
name and by the chain of operations around their launch (cuBLAS matmuls and cuDNN attention left
out). Found the float64 gradient norm that `train.float32_grad_norm` replaces.

PYTHONPATH=. python benchmarks/results/train/kernel_sites.py [--shape pythia-1b] [--micro-batch 8] [--layout mha]
"""
import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import bench_train

SKIPPED = ("nvjet", "sdpa_sm90", "cudnn::")  # matmuls and attention


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="pythia-1b")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--layout", default="mha", choices=sorted(bench_train.LAYOUTS))
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args()
    device = bench_train.single_gpu_process()
    b = args.micro_batch
    config = bench_train.layout_config(args.shape, args.layout)
    ds = bench_train.RandomRows(b * (7 + args.steps), 2048, config.vocab_size)
    engine = bench_train._engine("mlkv", config, bench_train.ds_config(b))
    bench_train.time_steps(engine, ds, b, 1, 6, device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        bench_train.time_steps(engine, ds, b, args.steps, 0, device)
    by_name, by_site = collections.Counter(), collections.Counter()
    for ev in prof.profiler.function_events:
        if ev.device_type != torch.autograd.DeviceType.CPU or not ev.kernels:
            continue
        chain, parent = [], ev
        while parent is not None and len(chain) < 4:
            chain.append(parent.name[:60])
            parent = parent.cpu_parent
        for k in ev.kernels:
            if not any(word in k.name for word in SKIPPED):
                by_name[k.name[:70]] += k.duration / args.steps / 1e3
                by_site[(k.name[:70], " < ".join(chain))] += k.duration / args.steps / 1e3
    print(f"== {args.shape} {args.layout} micro-batch {b}: kernels other than matmuls and attention (ms/step)")
    for name, ms in by_name.most_common(25):
        print(f"{ms:8.2f}  {name}")
    print("== by the operations around their launch")
    for (name, chain), ms in by_site.most_common(60):
        print(f"{ms:8.2f}  {name}\n          ops: {chain}")


if __name__ == "__main__":
    main()
