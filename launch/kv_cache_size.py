"""The theoretical KV cache size of MHA, GQA, MQA and MLKV for one model shape (the paper's Table 1).

python launch/kv_cache_size.py --layers 96 --heads 96 --head-dim 128 --batch 8 --seq 1024 \
    --kv-layers 24 --kv-groups 8 --dtype fp16
python launch/kv_cache_size.py --preset llama-3.2-1b --batch 8 --seq 2048 --kv-layers 8 --kv-groups 1
"""

import argparse
import json
import sys
from pathlib import Path

from megatron_mlkv.cli import entry_point
from megatron_mlkv.layout import DTYPE_BYTES, cache_size_table, format_cache_table


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


@entry_point
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--preset",
        help="take l, h and d_k from a released shape (config.preset: pythia-160m, ..., llama-3.2-1b, smollm-135m)",
    )
    p.add_argument("--layers", type=positive, help="l, decoder layers")
    p.add_argument("--heads", type=positive, help="h, query heads per layer")
    p.add_argument("--head-dim", type=positive, help="d_k")
    p.add_argument("--batch", type=positive, default=1, help="b")
    p.add_argument("--seq", type=positive, default=2048, help="s, cached tokens")
    p.add_argument("--kv-layers", type=positive, required=True, help="m, layers that own KV (MLKV)")
    p.add_argument("--kv-groups", type=positive, required=True, help="g, KV heads per owner layer (GQA, MLKV)")
    p.add_argument("--dtype", default="fp16", choices=sorted(DTYPE_BYTES))
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = p.parse_args(argv)
    if args.preset:
        from megatron_mlkv.config import preset

        shape = preset(args.preset)
        args.layers = args.layers or shape.num_layers
        args.heads = args.heads or shape.num_heads
        args.head_dim = args.head_dim or shape.head_dim
    missing = [f"--{k.replace('_', '-')}" for k in ("layers", "heads", "head_dim") if getattr(args, k) is None]
    if missing:
        p.error(f"{', '.join(missing)} required (or --preset)")
    rows = cache_size_table(
        args.layers, args.heads, args.head_dim, args.batch, args.seq, args.kv_layers, args.kv_groups, args.dtype
    )
    print(format_cache_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
