"""Tokenize documents and pack them into fixed-length rows (PREFIX.bin/.idx/.json) for uptraining.

python data_tools/pack_pile.py --input EleutherAI/the_pile_deduplicated \\
    --tokenizer EleutherAI/pythia-160m-deduped --seq-len 2048 --num-docs 6000000 --workers 16 --out data/pile_6m
python data_tools/pack_pile.py --input 'corpus/*.jsonl.zst' --tokenizer tok/tokenizer.json --out data/mine

All logic lives in megatron_mlkv/data/ (pack, PackedDataset); docs/data.md.
"""

import sys
from dataclasses import dataclass

from megatron_mlkv.cli import Options, entry_point, option
from megatron_mlkv.data import DEFAULT_SOURCE, PACKINGS, format_summary, pack


@dataclass(kw_only=True)
class PackOptions(Options):
    input: list[str] = option(
        help=f"hub dataset name (streamed; default {DEFAULT_SOURCE}) or local "
        ".jsonl/.jsonl.zst/.json/.parquet/.txt files, globs or folders",
        default_factory=lambda: [DEFAULT_SOURCE],
        nargs="+",
        metavar="SRC",
    )
    tokenizer: str = option(help="hub name, tokenizer folder, tokenizer.json or sentencepiece .model")
    seq_len: int = option(2048, "tokens per row (default 2048)", int)
    out: str = option(help="writes PREFIX.bin, PREFIX.idx, PREFIX.json", metavar="PREFIX")
    num_docs: int | None = option(None, "the first N documents (after --fraction)", int, metavar="N")
    fraction: float | None = option(None, "a seeded random sample of this share of the documents", float, metavar="F")
    seed: int = option(0, "seed of --fraction (default 0)", int)
    text_key: str = option("text", "JSON/parquet field holding the text (default 'text')")
    packing: str = option(
        "best-fit",
        "best-fit (default: fills > 99%% of rows) or the reference implementation's greedy packing",
        choices=PACKINGS,
    )
    max_doc_tokens: int | None = option(
        None,
        "keep at most N tokens of a document, end-of-document token included (default: all)",
        int,
        metavar="N",
    )
    workers: int = option(1, "tokenizer processes (default 1)", int, metavar="W")
    overwrite: bool = option(False, "replace an existing PREFIX (refused otherwise)")
    progress: bool = option(True, "no progress bar", flag="--no-progress")


@entry_point
def main(argv=None) -> int:
    args = PackOptions.from_argv(argv, __doc__)
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
