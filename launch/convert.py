"""Convert a GPT-NeoX / Pythia checkpoint into an MHA, GQA, MQA or MLKV layout (the uptraining start).

python launch/convert.py --base EleutherAI/pythia-160m-deduped --kv-layers 6 --kv-groups 1 --out ckpt/mlkv-6
python launch/convert.py --base BASE --kv-owner-map 0,0,0,3 --kv-groups 2 --out ckpt/custom
python launch/convert.py --base EleutherAI/pythia-160m-deduped --paper-variants --out-root ckpt
python launch/convert.py --base faridlazuarda/pythia-160m-mlkv-6-b12-g2-v1 --revision master --out ckpt/paper-mlkv-6

A checkpoint of the MLKV paper's own code (pythia-mlkv) is recognised and converted as it is.

All logic lives in megatron_mlkv/conversion/ (convert_checkpoint, convert_paper_variants); docs/convert.md.
"""

import argparse
import sys

from megatron_mlkv.cli import entry_point
from megatron_mlkv.conversion import (
    DTYPES,
    MERGE_MODES,
    MLP_INITS,
    convert_checkpoint,
    convert_paper_variants,
    format_report,
    format_variants_table,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--base",
        required=True,
        help="hub model name or local transformers folder of a GPT-NeoX model (or of the paper's pythia-mlkv code)",
    )
    p.add_argument("--revision", help="hub branch, tag or commit of --base (default: the hub's default)")
    p.add_argument("--out", help="output folder (one layout)")
    p.add_argument("--kv-layers", type=int, help="m, layers that own K/V (default: all)")
    p.add_argument("--kv-groups", type=int, help="g, KV heads per owner layer (default: all h heads)")
    p.add_argument(
        "--kv-owner-map",
        metavar="MAP",
        help="explicit owner of each layer, e.g. 0,0,2,2 (layer i attends with layer MAP[i]'s K/V)",
    )
    p.add_argument(
        "--merge",
        choices=MERGE_MODES,
        default="mean",
        help="how layers merge into their owner: arithmetic mean (default) or the reference "
        "code's sequential pairwise mean",
    )
    p.add_argument(
        "--mlp-init",
        choices=MLP_INITS,
        default="zero",
        help="added MLP units: zero output weights (function-preserving, default) or copies "
        "of the first units (the reference code)",
    )
    p.add_argument(
        "--no-match-params",
        dest="match_params",
        action="store_false",
        help="keep the base's MLP width instead of matching its parameter count",
    )
    p.add_argument(
        "--random-init",
        action="store_true",
        help="the layout with freshly initialised weights instead of the base's (a from-scratch baseline)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --random-init (default 0)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="output dtype (default: the base's)")
    p.add_argument("--max-shard-size", default="2GB", help="safetensors shard size (default 2GB)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output folders")
    p.add_argument("--report", metavar="FILE", help="also write the JSON report here")
    p.add_argument(
        "--paper-variants",
        action="store_true",
        help="convert into the paper's eight layouts, as folders under --out-root",
    )
    p.add_argument("--out-root", help="parent folder of the --paper-variants outputs")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


@entry_point
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.paper_variants and args.random_init:
        parser.error("--random-init makes one layout: give --out, not --paper-variants")
    if args.paper_variants:
        if not args.out_root or args.out or args.kv_layers or args.kv_groups or args.kv_owner_map:
            parser.error(
                "--paper-variants takes --out-root, and none of --out, --kv-layers, --kv-groups, --kv-owner-map"
            )
    elif not args.out or args.out_root:
        parser.error("give --out (or --paper-variants with --out-root)")
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
