"""lm-evaluation-harness on one checkpoint (a converted folder or an uptraining export).

python launch/evaluate.py --model runs/mlkv-6/hf/step_1000 --out runs/mlkv-6/eval/step_1000.json
python launch/evaluate.py --model ckpt/mlkv-6 --tasks my_task --include-path my_tasks --limit 100 --out e.json
python launch/evaluate.py --model faridlazuarda/pythia-160m-mlkv-6-b12-g2-v1 --revision master --out eval/p-6.json

FILE.json holds lm-eval's `results` mapping plus the model's KV layout and KV bytes per token; a
markdown table is printed. The logic lives in megatron_mlkv/evaluation/harness.py; docs/evaluate.md.
"""

import sys
from dataclasses import dataclass

from megatron_mlkv.cli import Options, entry_point, option
from megatron_mlkv.errors import MLKVError
from megatron_mlkv.evaluation.harness import DEFAULT_TASKS, DTYPES, evaluate_checkpoint, format_error, format_results


@dataclass(kw_only=True)
class EvaluateOptions(Options):
    model: str = option(
        help="transformers folder (launch/convert.py, RUN_DIR/hf/step_N) or hub name; the MLKV paper's "
        "released pythia-mlkv checkpoints too"
    )
    revision: str | None = option(None, "hub branch, tag or commit of --model (default: the hub's default)")
    tasks: str = option(",".join(DEFAULT_TASKS), f"comma-separated lm-eval tasks (default {','.join(DEFAULT_TASKS)})")
    include_path: str | None = option(None, "folder of extra lm-eval task YAMLs")
    limit: float | None = option(None, "at most N documents per task (a fraction if < 1; for quick checks)", float)
    batch_size: str = option("8", "batch size, or 'auto' (default 8)")
    device: str | None = option(None, "torch device (default: cuda if available, else cpu)")
    dtype: str = option(
        "auto",
        "what the model computes in, as lm-eval's dtype= (default auto: the checkpoint's own)",
        choices=DTYPES,
    )
    out: str = option(help="JSON file for the results (written atomically)")


@entry_point
def main(argv=None) -> int:
    args = EvaluateOptions.from_argv(argv, __doc__)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    batch_size = int(args.batch_size) if args.batch_size.isdigit() else args.batch_size
    try:
        result = evaluate_checkpoint(
            args.model,
            args.tasks,
            include_path=args.include_path,
            limit=limit,
            batch_size=batch_size,
            out_path=args.out,
            device=args.device,
            dtype=args.dtype,
            revision=args.revision,
        )
    except MLKVError:
        raise  # one line through cli.entry_point
    except Exception as e:  # lm-eval/datasets failures, e.g. a task whose data cannot be downloaded
        print(f"error: evaluation failed: {format_error(e)}", file=sys.stderr)
        return 1
    print(format_results(result))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
