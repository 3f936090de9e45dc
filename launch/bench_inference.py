"""Inference benchmark of MLKV layouts: KV cache bytes, peak memory, maximum batch, decode tokens/s.

A KV cache pre-filled with --context random tokens, then --new-tokens decoded. Without
--batch-sizes the batch doubles until out of memory (GPU; on CPU up to --max-batch).

python launch/bench_inference.py --model ckpt/mha ckpt/mlkv-6 --context 2000 --new-tokens 48 --out bench/
python launch/bench_inference.py --shape pythia-160m --layouts mha,mlkv-6 --baseline-hf --out bench/
python launch/bench_inference.py --include-results a/results.json b/results.json --out merged/   # re-plot

Writes OUTDIR/results.json (one record per model and batch size), summary.md, memory.png,
throughput.png, and accuracy.png with --eval-json.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from megatron_mlkv.cli import entry_point
from megatron_mlkv.conversion import DTYPES
from megatron_mlkv.errors import BenchError
from megatron_mlkv.inference.bench import (
    base_class_holds,
    from_folder,
    from_shape,
    run_benchmark,
    transformers_baseline,
)
from megatron_mlkv.loading import read_config


@entry_point
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=[], metavar="DIR", help="exported MLKV folders")
    p.add_argument(
        "--shape",
        help="a preset shape (pythia-160m, ..., llama-3.2-1b, smollm-135m): random weights, none needed",
    )
    p.add_argument(
        "--layouts",
        default="all",
        help="with --shape: base (its own layout; mha for Pythia), the paper's names (mlkv-6, gqa-48, ...), all, or "
        "m:g, comma-separated (default: all)",
    )
    p.add_argument("--context", type=int, default=2000, help="tokens in the cache before decoding")
    p.add_argument("--new-tokens", type=int, default=48, help="tokens decoded (timed)")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="measure these; default: search up to OOM")
    p.add_argument("--max-batch", type=int, help="largest batch the search tries (required on CPU)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument(
        "--baseline-hf",
        action="store_true",
        help="also benchmark transformers' GPTNeoXForCausalLM twice: its default cache, and its "
        "static cache with compiled decoding (ratios take the faster at each batch)",
    )
    p.add_argument(
        "--hf-model",
        metavar="DIR",
        help="a folder of transformers' own class for --baseline-hf (default: the --shape, or a folder among --model "
        "that class holds)",
    )
    p.add_argument(
        "--eval-json",
        nargs="+",
        default=[],
        metavar="FILE",
        help="evaluation results (lm-eval 'results' plus 'layout') for the accuracy-vs-memory plot",
    )
    p.add_argument(
        "--include-results",
        nargs="+",
        default=[],
        metavar="FILE",
        help="records of earlier runs (results.json) to report together with this run's; a "
        "later record of the same model, engine, context and batch replaces an earlier one",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    torch.manual_seed(args.seed)
    candidates = [from_folder(path, dtype, device) for path in args.model]
    if args.shape:
        candidates += from_shape(args.shape, args.layouts, dtype, device)
    if args.baseline_hf:
        held = [c.name for c in candidates[: len(args.model)] if base_class_holds(read_config(c.name)[1])]
        candidates[:0] = transformers_baseline(dtype, device, args.hf_model, args.shape, held[0] if held else None)
    previous = [r for f in args.include_results for r in json.loads(Path(f).read_text())]
    if not candidates and not previous:
        raise BenchError("nothing to benchmark: give --model DIR ..., --shape NAME, or --include-results")
    run_benchmark(
        candidates,
        args.out,
        args.context,
        args.new_tokens,
        device,
        dtype,
        args.batch_sizes,
        args.max_batch,
        args.eval_json,
        previous,
        log=lambda s: print(s, flush=True),
    )


if __name__ == "__main__":
    sys.exit(main())
