"""Tokenize and pack documents into fixed-length rows (PREFIX.bin/.idx/.json) for uptraining.

python data_tools/pack_pile.py --input EleutherAI/the_pile_deduplicated \
    --tokenizer EleutherAI/pythia-160m-deduped --seq-len 2048 --num-docs 6000000 --workers 16 --out data/pile_6m

The logic lives in megatron_mlkv/data.py.
"""
import argparse
import sys

from megatron_mlkv.data import DEFAULT_SOURCE, PACKINGS, DataError, format_summary, pack


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", default=[DEFAULT_SOURCE],
                   help="hub dataset name (streamed) or local .jsonl/.jsonl.zst/.json/.parquet/.txt files or globs")
    p.add_argument("--tokenizer", required=True, help="hub name, tokenizer folder, tokenizer.json or sentencepiece .model")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per row (default 2048)")
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    p.add_argument("--num-docs", type=int, help="the first N documents in source order")
    p.add_argument("--fraction", type=float, help="a seeded random sample of this share of the documents")
    p.add_argument("--seed", type=int, default=0, help="seed of --fraction (default 0)")
    p.add_argument("--text-key", default="text", help="field holding the text (default 'text')")
    p.add_argument("--packing", choices=PACKINGS, default="best-fit",
                   help="best-fit (default) or the reference implementation's greedy packing")
    p.add_argument("--max-doc-tokens", type=int, help="keep at most this many tokens of one document")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args = p.parse_args(argv)
    try:
        meta = pack(args.input, args.tokenizer, args.seq_len, args.out, num_docs=args.num_docs,
                    fraction=args.fraction, seed=args.seed, text_key=args.text_key, packing=args.packing,
                    max_doc_tokens=args.max_doc_tokens, workers=args.workers, progress=args.progress)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(meta, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
