"""Convert a GPT-NeoX / Pythia checkpoint into an MHA, GQA, MQA or MLKV layout (the uptraining start).

python launch/convert.py --base EleutherAI/pythia-160m-deduped --kv-layers 6 --kv-groups 1 --out ckpt/mlkv-6
python launch/convert.py --base BASE --kv-owner-map 0,0,0,3 --kv-groups 2 --out ckpt/custom
python launch/convert.py --base EleutherAI/pythia-160m-deduped --paper-variants --out-root ckpt
python launch/convert.py --base faridlazuarda/pythia-160m-mlkv-6-b12-g2-v1 --revision master --out ckpt/paper-mlkv-6

A checkpoint of the MLKV paper's own code (pythia-mlkv) is recognised and converted as it is.

All logic lives in megatron_mlkv/conversion/ (convert_checkpoint, convert_paper_variants); docs/convert.md.
"""

import sys
from dataclasses import dataclass

from megatron_mlkv.cli import Options, entry_point, option
from megatron_mlkv.conversion import (
    DTYPES,
    MERGE_MODES,
    MLP_INITS,
    convert_checkpoint,
    convert_paper_variants,
    format_report,
    format_variants_table,
)


@dataclass(kw_only=True)
class ConvertOptions(Options):
    base: str = option(
        help="hub model name or local transformers folder of a GPT-NeoX model (or of the paper's pythia-mlkv code)"
    )
    revision: str | None = option(None, "hub branch, tag or commit of --base (default: the hub's default)")
    out: str | None = option(None, "output folder (one layout)")
    kv_layers: int | None = option(None, "m, layers that own K/V (default: all)", int)
    kv_groups: int | None = option(None, "g, KV heads per owner layer (default: all h heads)", int)
    kv_owner_map: str | None = option(
        None, "explicit owner of each layer, e.g. 0,0,2,2 (layer i attends with layer MAP[i]'s K/V)", metavar="MAP"
    )
    merge: str = option(
        "mean",
        "how layers merge into their owner: arithmetic mean (default) or the reference code's sequential pairwise mean",
        choices=MERGE_MODES,
    )
    mlp_init: str = option(
        "zero",
        "added MLP units: zero output weights (function-preserving, default) or copies of the first units (the "
        "reference code)",
        choices=MLP_INITS,
    )
    match_params: bool = option(
        True, "keep the base's MLP width instead of matching its parameter count", flag="--no-match-params"
    )
    mlp_multiple: int = option(
        1,
        "round the matched MLP width to a multiple of N (64: whole GPU tiles; at least 16 for --fp8 "
        "uptraining); the parameter count then matches within N/2 MLP units a layer (default 1: exactly)",
        int,
        minimum=1,
        metavar="N",
    )
    random_init: bool = option(
        False, "the layout with freshly initialised weights instead of the base's (a from-scratch baseline)"
    )
    seed: int = option(0, "seed of --random-init (default 0)", int)
    dtype: str | None = option(None, "output dtype (default: the base's)", choices=sorted(DTYPES))
    max_shard_size: str = option("2GB", "safetensors shard size (default 2GB)")
    overwrite: bool = option(False, "replace existing output folders")
    report: str | None = option(None, "also write the JSON report here", metavar="FILE")
    paper_variants: bool = option(False, "convert into the paper's eight layouts, as folders under --out-root")
    out_root: str | None = option(None, "parent folder of the --paper-variants outputs")
    progress: bool = option(True, "no progress bars", flag="--no-progress")

    def problem(self) -> str | None:
        if self.paper_variants and self.random_init:
            return "--random-init makes one layout: give --out, not --paper-variants"
        if self.paper_variants:
            if not self.out_root or self.out or self.kv_layers or self.kv_groups or self.kv_owner_map:
                return "--paper-variants takes --out-root, and none of --out, --kv-layers, --kv-groups, --kv-owner-map"
        elif not self.out or self.out_root:
            return "give --out (or --paper-variants with --out-root)"
        return None


@entry_point
def main(argv=None) -> int:
    args = ConvertOptions.from_argv(argv, __doc__)
    common = dict(
        merge=args.merge,
        mlp_init=args.mlp_init,
        match_params=args.match_params,
        overwrite=args.overwrite,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        report_path=args.report,
        progress=args.progress,
        revision=args.revision,
        mlp_multiple=args.mlp_multiple,
    )
    if args.paper_variants:
        print(format_variants_table(convert_paper_variants(args.base, args.out_root, **common)))
    else:
        print(
            format_report(
                convert_checkpoint(
                    args.base,
                    args.out,
                    args.kv_layers,
                    args.kv_groups,
                    args.kv_owner_map,
                    random_init=args.random_init,
                    seed=args.seed,
                    **common,
                )
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
