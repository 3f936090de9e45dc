"""Uptrain a converted checkpoint with DeepSpeed (the paper's recipe by default).

deepspeed --num_gpus 2 launch/uptrain.py --ds_config ds_configs/zero2.json \
    --init ckpt/mlkv-6 --data data/pile_6m --valid-rows 200 --out runs/mlkv-6

Rerunning the same command resumes from the latest complete checkpoint. The logic lives in
megatron_mlkv/train.py.
"""

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ds_config", required=True, help="DeepSpeed JSON: batch size, ZeRO stage, precision, clipping")
    p.add_argument("--init", required=True, help="converted transformers folder (launch/convert.py)")
    p.add_argument("--data", required=True, help="packed data prefix (data_tools/pack_pile.py)")
    p.add_argument("--out", required=True, help="run folder: metrics, TensorBoard, checkpoints, exports")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (ranks per TP group, inside a node)")
    p.add_argument("--train-iters", type=int, help="optimizer steps (default: one pass over --data)")
    p.add_argument("--train-tokens", type=int, help="train on this many tokens instead of one pass")
    p.add_argument("--lr", type=float, default=6e-4, help="peak learning rate (default 6e-4)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of the peak (default 0.1)")
    p.add_argument("--warmup-ratio", type=float, default=0.2, help="share of steps with linear warm-up (default 0.2)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay, not on biases/LayerNorm")
    p.add_argument("--valid-data", help="packed prefix of held-out rows for validation")
    p.add_argument(
        "--valid-rows",
        type=int,
        default=0,
        help="validation rows: the first N of --valid-data, or else the last N of --data held out",
    )
    p.add_argument("--save-interval", type=int, default=1000, help="checkpoint (and validate, export) every N steps")
    p.add_argument("--keep-last", type=int, default=0, help="keep only the newest K DeepSpeed checkpoints (0: all)")
    p.add_argument(
        "--export-dtype",
        choices=("auto", "bfloat16", "float32"),
        default="auto",
        help="dtype of the transformers export of each checkpoint: auto = the training weights' "
        "(bfloat16 under the shipped configs); float32 = the optimizer's fp32 master weights",
    )
    p.add_argument("--log-interval", type=int, default=1, help="log metrics every N steps")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute layer activations in backward")
    p.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="do not torch.compile the layers (compiled by default on GPUs without --tp)",
    )
    p.add_argument(
        "--loss",
        choices=("auto", "fused", "chunked", "logits"),
        default="auto",
        help="loss implementation: auto = liger's fused linear cross-entropy on GPUs, full logits elsewhere",
    )
    p.add_argument("--seed", type=int, default=1234, help="model-side random seed")
    p.add_argument(
        "--data-seed",
        type=int,
        default=None,
        help="shuffle rows with this seed (default: the packed order, as the paper)",
    )
    p.add_argument(
        "--eval-tasks", help="lm-eval tasks to run at each checkpoint, e.g. arc_easy,lambada_openai,piqa,sciq"
    )
    p.add_argument("--eval-include-path", help="folder of extra lm-eval task YAMLs")
    p.add_argument("--eval-limit", type=int, help="evaluate at most N documents per task")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("save_interval", "log_interval"):
        if getattr(args, flag) < 1:
            build_parser().error(f"--{flag.replace('_', '-')} must be >= 1")
    from megatron_mlkv.train import main as train_main

    return train_main(args)


if __name__ == "__main__":
    sys.exit(main())
