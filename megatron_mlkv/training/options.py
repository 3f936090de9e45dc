"""The options of one uptraining run, as a dataclass whose fields generate the flags of
launch/uptrain.py (`cli.Options`, as every command's): each field's default and help live here once."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..cli import Options, option
from .float8 import DEFAULT_RECIPE, RECIPES

# distillation defaults (--distill-from): A, the KL term's share, and T, its temperature: the best of the
# uptraining study's sweep (benchmarks/README.md, "Distillation from the base"; docs/uptrain.md)
DISTILL_WEIGHT = 1.0
DISTILL_TEMPERATURE = 1.0


@dataclass
class RunOptions(Options):
    """An uptraining run. The paper's recipe by default: AdamW at peak lr 6e-4, linear warm-up over 20%
    of the steps, cosine decay to 10%, one pass over the data."""

    ds_config: str = option(help="DeepSpeed JSON: batch size, ZeRO stage, precision, clipping", flag="--ds_config")
    init: str = option(help="converted transformers folder (launch/convert.py)")
    data: str = option(help="packed data prefix (data_tools/pack_pile.py)")
    out: str = option(help="run folder: metrics, TensorBoard, checkpoints, exports")
    tp: int = option(1, "tensor-parallel size (ranks per TP group, inside a node)", int)
    train_iters: int | None = option(None, "optimizer steps (default: one pass over --data)", int)
    train_tokens: int | None = option(None, "train on this many tokens instead of one pass", int)
    lr: float = option(6e-4, "peak learning rate (default 6e-4)", float)
    min_lr_ratio: float = option(0.1, "final lr as a fraction of the peak (default 0.1)", float)
    warmup_ratio: float = option(0.2, "share of steps with linear warm-up (default 0.2)", float)
    weight_decay: float = option(0.01, "AdamW weight decay, not on biases and norms", float)
    valid_data: str | None = option(None, "packed prefix of held-out rows for validation")
    valid_rows: int = option(
        0, "validation rows: the first N of --valid-data, or else the last N of --data held out", int
    )
    save_interval: int = option(1000, "checkpoint (and validate, export) every N steps", int, minimum=1)
    keep_last: int = option(0, "keep only the newest K DeepSpeed checkpoints (0: all)", int)
    export_dtype: str = option(
        "auto",
        "dtype of the transformers export of each checkpoint: auto = the training weights' "
        "(bfloat16 under the shipped configs); float32 = the optimizer's fp32 master weights",
        choices=("auto", "bfloat16", "float32"),
    )
    log_interval: int = option(1, "log metrics every N steps", int, minimum=1)
    activation_checkpointing: bool = option(False, "recompute layer activations in backward")
    compile: bool = option(
        True, "do not torch.compile the layers (compiled by default on GPUs without --tp)", flag="--no-compile"
    )
    loss: str = option(
        "auto",
        "loss implementation: auto = liger's fused linear cross-entropy on GPUs, full logits elsewhere",
        choices=("auto", "fused", "chunked", "logits"),
    )
    fp8: str | None = option(
        None,
        "train the blocks' linear layers in float8 (torchao; GPUs of compute capability 8.9+), with this "
        f"recipe: {' or '.join(RECIPES)} scaling (default {DEFAULT_RECIPE}; docs/uptrain.md)",
        choices=RECIPES,
        nargs="?",
        const=DEFAULT_RECIPE,
        metavar="RECIPE",
    )
    distill_from: str | None = option(
        None,
        "distill from this teacher (a checkpoint folder with the student's tokenizer, normally the base of "
        "--init): loss = (1 - A)·CE + A·T²·KL(teacher || student)",
    )
    distill_weight: float | None = option(None, f"A, the share of the KL term (default {DISTILL_WEIGHT})", float)
    distill_temperature: float | None = option(
        None, f"T, the temperature of both distributions in the KL term (default {DISTILL_TEMPERATURE})", float
    )
    allow_other_tokenizer: bool = option(
        False, "train although --data was packed with another tokenizer than --init's (recorded in the run)"
    )
    seed: int = option(1234, "model-side random seed", int)
    data_seed: int | None = option(None, "shuffle rows with this seed (default: the packed order, as the paper)", int)
    eval_tasks: str | None = option(
        None, "lm-eval tasks to run at each checkpoint, e.g. arc_easy,lambada_openai,piqa,sciq"
    )
    eval_include_path: str | None = option(None, "folder of extra lm-eval task YAMLs")
    eval_limit: int | None = option(None, "evaluate at most N documents per task", int)
    # set by the deepspeed launcher, spelt as it spells it
    local_rank: int = option(0, argparse.SUPPRESS, int, flag="--local_rank")
