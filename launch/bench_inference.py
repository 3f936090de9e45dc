"""Inference benchmark of MLKV layouts: KV cache bytes, peak memory, maximum batch, decode tokens/s.

A KV cache pre-filled with --context random tokens, then --new-tokens decoded. Without
--batch-sizes the batch doubles until out of memory (GPU; on CPU up to --max-batch).

python launch/bench_inference.py --model ckpt/mha ckpt/mlkv-6 --context 2000 --new-tokens 48 --out bench/
python launch/bench_inference.py --shape pythia-160m --layouts mha,mlkv-6 --baseline-hf --out bench/
python launch/bench_inference.py --include-results a/results.json b/results.json --out merged/   # re-plot

Writes OUTDIR/results.json (one record per model and batch size), summary.md, memory.png,
throughput.png, and accuracy.png with --eval-json.
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_mlkv.cli import Options, entry_point, option
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


@dataclass(kw_only=True)
class BenchOptions(Options):
    model: list[str] = option(help="exported MLKV folders", default_factory=list, nargs="+", metavar="DIR")
    shape: str | None = option(
        None, "a preset shape (pythia-160m, ..., llama-3.2-1b, smollm-135m): random weights, none needed"
    )
    layouts: str = option(
        "all",
        "with --shape: base (its own layout; mha for Pythia), the paper's names (mlkv-6, gqa-48, ...), all, or "
        "m:g, comma-separated (default: all)",
    )
    context: int = option(2000, "tokens in the cache before decoding", int)
    new_tokens: int = option(48, "tokens decoded (timed)", int)
    batch_sizes: list[int] | None = option(None, "measure these; default: search up to OOM", int, nargs="+")
    max_batch: int | None = option(None, "largest batch the search tries (required on CPU)", int)
    out: Path = option(help="output folder", type=Path)
    dtype: str | None = option(None, "default: bf16 on CUDA, fp32 on CPU", choices=sorted(DTYPES))
    device: str | None = option(None, "default: cuda if available, else cpu")
    baseline_hf: bool = option(
        False,
        "also benchmark transformers' GPTNeoXForCausalLM twice: its default cache, and its "
        "static cache with compiled decoding (ratios take the faster at each batch)",
    )
    hf_model: str | None = option(
        None,
        "a folder of transformers' own class for --baseline-hf (default: the --shape, or a folder among --model "
        "that class holds)",
        metavar="DIR",
    )
    eval_json: list[str] = option(
        help="evaluation results (lm-eval 'results' plus 'layout') for the accuracy-vs-memory plot",
        default_factory=list,
        nargs="+",
        metavar="FILE",
    )
    include_results: list[str] = option(
        help="records of earlier runs (results.json) to report together with this run's; a "
        "later record of the same model, engine, context and batch replaces an earlier one",
        default_factory=list,
        nargs="+",
        metavar="FILE",
    )
    seed: int = option(0, "seed of the random weights (default 0)", int)


@entry_point
def main(argv=None):
    args = BenchOptions.from_argv(argv, __doc__)

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
