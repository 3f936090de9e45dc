"""Tokenize documents and pack them into fixed-length rows (PREFIX.bin/.idx/.json) for uptraining.

python data_tools/pack_pile.py --input EleutherAI/the_pile_deduplicated \\
    --tokenizer EleutherAI/pythia-160m-deduped --seq-len 2048 --num-docs 6000000 --workers 16 --out data/pile_6m
python data_tools/pack_pile.py --input 'corpus/*.jsonl.zst' --tokenizer tok/tokenizer.json --out data/mine

All logic lives in megatron_mlkv/data/ (pack, PackedDataset); docs/data.md.
"""

import argparse
import sys

from megatron_mlkv.cli import entry_point
from megatron_mlkv.data import DEFAULT_SOURCE, PACKINGS, format_summary, pack


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--input",
        nargs="+",
        default=[DEFAULT_SOURCE],
        metavar="SRC",
        help=f"hub dataset name (streamed; default {DEFAULT_SOURCE}) or local "
        ".jsonl/.jsonl.zst/.json/.parquet/.txt files, globs or folders",
    )
    p.add_argument(
        "--tokenizer", required=True, help="hub name, tokenizer folder, tokenizer.json or sentencepiece .model"
    )
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per row (default 2048)")
    p.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    p.add_argument("--num-docs", type=int, metavar="N", help="the first N documents (after --fraction)")
    p.add_argument("--fraction", type=float, metavar="F", help="a seeded random sample of this share of the documents")
    p.add_argument("--seed", type=int, default=0, help="seed of --fraction (default 0)")
    p.add_argument("--text-key", default="text", help="JSON/parquet field holding the text (default 'text')")
    p.add_argument(
        "--packing",
        choices=PACKINGS,
        default="best-fit",
        help="best-fit (default: fills > 99%% of rows) or the reference implementation's greedy packing",
    )
    p.add_argument(
        "--max-doc-tokens",
        type=int,
        metavar="N",
        help="keep at most N tokens of a document, end-of-document token included (default: all)",
    )
    p.add_argument("--workers", type=int, default=1, metavar="W", help="tokenizer processes (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX (refused otherwise)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


@entry_point
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        meta = pack(
            args.input,
            args.tokenizer,
            args.seq_len,
            args.out,
            num_docs=args.num_docs,
            fraction=args.fraction,
            seed=args.seed,
            text_key=args.text_key,
            packing=args.packing,
            max_doc_tokens=args.max_doc_tokens,
            workers=args.workers,
            progress=args.progress,
            overwrite=args.overwrite,
        )
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(format_summary(meta, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
