"""Pythia-160M MHA, micro-batch 12, ZeRO-2 bf16 (bench_train's setup and timing), in one run: our
path with each layer compiled on its own (`train.compile_blocks`, the default), the same with each
compiled layer also captured in CUDA graphs (torch.compile mode="reduce-overhead"), and
transformers. Tokens/s, MFU and the first losses (same seed: the two compile modes should agree).

PYTHONPATH=. python benchmarks/results/train/compile_modes.py [--variants layers,layers-cudagraphs,hf] [--out FILE.json]
"""
import argparse
import json
import os
import traceback

import torch

from megatron_mlkv import bench_train
from megatron_mlkv.model import MLKVTransformer
from megatron_mlkv.train import make_engine, matmul_flops_per_s

MODES = {"layers": None, "layers-cudagraphs": "reduce-overhead"}


def engine(variant: str, config, cfg: dict):
    if variant == "hf":
        return bench_train._hf_engine(config, cfg)
    torch.manual_seed(0)
    model = MLKVTransformer(config).cuda()
    for block in model.layers:
        block.forward = torch.compile(block.forward, mode=MODES[variant])
    return make_engine(model, cfg, total_steps=1000)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default="layers,layers-cudagraphs,hf")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--out")
    args = p.parse_args()
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="29512").items():
        os.environ.setdefault(key, value)
    import deepspeed
    deepspeed.init_distributed(dist_backend="nccl")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    peak = matmul_flops_per_s(device, torch.bfloat16)
    micro, seq = 12, 2048
    config = bench_train.layout_config("pythia-160m", "mha")
    ds = bench_train.RandomRows(micro * (args.warmup + args.steps), seq, config.vocab_size)
    records = []
    for variant in args.variants.split(","):
        record = dict(variant=variant, micro_batch=micro, seq_len=seq, device=torch.cuda.get_device_name(device),
                      matmul_flops_per_s=peak)
        e = None
        try:
            e = engine(variant, config, bench_train.ds_config(micro))
            record.update(bench_train.time_steps(e, ds, micro, args.steps, args.warmup, device,
                                                 summed=variant != "hf"))
            record["mfu"] = record["tokens_per_s"] * config.flops_per_token(seq) / peak
            print(f"{variant:18s} {record['tokens_per_s']:10,.0f} tokens/s  MFU {record['mfu']:.1%}  "
                  f"peak {record['peak_memory_bytes'] / 2**30:.1f} GiB  losses {record['losses'][:4]}", flush=True)
        except Exception as exc:  # noqa: BLE001 - an experiment: a variant that fails is a result
            record["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            traceback.print_exc(limit=-6)
        bench_train._release(e)
        records.append(record)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
