"""The theoretical KV cache size of MHA, GQA, MQA and MLKV for one model shape (the paper's Table 1).

python launch/kv_cache_size.py --layers 96 --heads 96 --head-dim 128 --batch 8 --seq 1024 \
    --kv-layers 24 --kv-groups 8 --dtype fp16
python launch/kv_cache_size.py --preset llama-3.2-1b --batch 8 --seq 2048 --kv-layers 8 --kv-groups 1
"""

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from megatron_mlkv.cli import Options, entry_point, option
from megatron_mlkv.layout import DTYPE_BYTES, cache_size_table, format_cache_table


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


@dataclass(kw_only=True)
class CacheSizeOptions(Options):
    preset: str | None = option(
        None,
        "take l, h and d_k from a released shape (config.preset: pythia-160m, ..., llama-3.2-1b, smollm-135m)",
    )
    layers: int | None = option(None, "l, decoder layers", positive)
    heads: int | None = option(None, "h, query heads per layer", positive)
    head_dim: int | None = option(None, "d_k", positive)
    batch: int = option(1, "b", positive)
    seq: int = option(2048, "s, cached tokens", positive)
    kv_layers: int = option(help="m, layers that own KV (MLKV)", type=positive)
    kv_groups: int = option(help="g, KV heads per owner layer (GQA, MLKV)", type=positive)
    dtype: str = option("fp16", "bytes per cached number (default fp16)", choices=sorted(DTYPE_BYTES))
    json: str | None = option(None, "also write the rows as JSON", metavar="FILE")

    def __post_init__(self):
        if self.preset:
            from megatron_mlkv.config import preset

            shape = preset(self.preset)
            self.layers = self.layers or shape.num_layers
            self.heads = self.heads or shape.num_heads
            self.head_dim = self.head_dim or shape.head_dim

    def problem(self) -> str | None:
        missing = [f"--{k.replace('_', '-')}" for k in ("layers", "heads", "head_dim") if getattr(self, k) is None]
        return f"{', '.join(missing)} required (or --preset)" if missing else None


@entry_point
def main(argv=None):
    args = CacheSizeOptions.from_argv(argv, __doc__)
    rows = cache_size_table(
        args.layers, args.heads, args.head_dim, args.batch, args.seq, args.kv_layers, args.kv_groups, args.dtype
    )
    print(format_cache_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
