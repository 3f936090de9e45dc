"""Training throughput on one GPU: our uptraining path vs transformers + DeepSpeed (ZeRO-2, bf16).

python launch/bench_train.py --shapes pythia-160m,pythia-410m,pythia-1b --layouts mha,mqa-12,mlkv-6 \
    --out benchmarks/results/train_h100.json

The logic lives in megatron_mlkv/bench_train.py; results are discussed in benchmarks/README.md.
"""

import argparse
import sys

from megatron_mlkv.bench_train import DEFAULT_MICRO, ENGINES, LAYOUTS, format_table, run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="pythia-160m,pythia-410m,pythia-1b", help="Pythia presets, comma-separated")
    p.add_argument("--layouts", default="mha,mqa-12,mlkv-6", help=f"comma-separated, from {', '.join(LAYOUTS)}")
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
    p.add_argument("--engines", default="mlkv,hf", help=f"comma-separated, from {', '.join(ENGINES)}")
    p.add_argument("--loss-check-steps", type=int, default=30, help="steps of the eager-vs-optimised loss curve")
    p.add_argument("--ds-config", help="DeepSpeed config for both engines (default ds_configs/zero2.json)")
    p.add_argument(
        "--profile", action="store_true", help="print a torch.profiler table for the first shape/layout instead"
    )
    p.add_argument(
        "--memory",
        action="store_true",
        help="instead: what a training forward saves for backward, by kind, per shape and layout "
        "(and the peak on a GPU); runs on the CPU too",
    )
    p.add_argument("--out", default="benchmarks/results/train.json", help="JSON output")
    args = p.parse_args(argv)
    import torch

    micro = dict(DEFAULT_MICRO)
    for item in args.micro_batch:
        shape, _, value = item.partition("=")
        micro[shape if shape.startswith("pythia-") else f"pythia-{shape}"] = int(value)
    if args.memory:
        return memory_mode(args, micro)
    if not torch.cuda.is_available():
        print("error: bench_train.py measures GPU throughput; no CUDA device found", file=sys.stderr)
        return 2
    if args.ds_config:
        from megatron_mlkv import bench_train

        bench_train.DS_CONFIG = args.ds_config
    shapes = args.shapes.split(",")
    unknown = [l for l in args.layouts.split(",") if l not in LAYOUTS]
    if unknown:
        print(f"error: --layouts {','.join(unknown)} unknown; allowed: {', '.join(LAYOUTS)}", file=sys.stderr)
        return 2
    unknown = [e for e in args.engines.split(",") if e not in ENGINES]
    if unknown:
        print(f"error: --engines {','.join(unknown)} unknown; allowed: {', '.join(ENGINES)}", file=sys.stderr)
        return 2
    if args.profile:
        from megatron_mlkv.bench_train import profile

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
    )
    print(format_table(records))
    return 0


def memory_mode(args, micro: dict) -> int:
    """--memory: `bench_train.saved_memory` per shape and layout, a table, and OUT_memory.json."""
    import json
    from pathlib import Path

    import torch

    from megatron_mlkv.bench_train import format_memory, layout_config, saved_memory

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
