"""The options of one uptraining run, as a dataclass whose fields generate the flags of
launch/uptrain.py (`RunOptions.parser`): each field's default and help live here once."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

# distillation defaults (--distill-from): A, the KL term's share, and T, its temperature: the best of the
# uptraining study's sweep (benchmarks/README.md, "Distillation from the base"; docs/uptrain.md)
DISTILL_WEIGHT = 1.0
DISTILL_TEMPERATURE = 1.0


def _flag(help: str, type=None, flag: str | None = None, **kwargs) -> dict:
    return dict(help=help, type=type, flag=flag, **kwargs)


def _flag_name(f: dataclasses.Field) -> str:
    """A field's flag: its `flag`, else `--field-name`."""
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


@dataclass
class RunOptions:
    """An uptraining run. The paper's recipe by default: AdamW at peak lr 6e-4, linear warm-up over 20%
    of the steps, cosine decay to 10%, one pass over the data."""

    ds_config: str = field(
        metadata=_flag("DeepSpeed JSON: batch size, ZeRO stage, precision, clipping", flag="--ds_config")
    )
    init: str = field(metadata=_flag("converted transformers folder (launch/convert.py)"))
    data: str = field(metadata=_flag("packed data prefix (data_tools/pack_pile.py)"))
    out: str = field(metadata=_flag("run folder: metrics, TensorBoard, checkpoints, exports"))
    tp: int = field(default=1, metadata=_flag("tensor-parallel size (ranks per TP group, inside a node)", int))
    train_iters: int | None = field(
        default=None, metadata=_flag("optimizer steps (default: one pass over --data)", int)
    )
    train_tokens: int | None = field(default=None, metadata=_flag("train on this many tokens instead of one pass", int))
    lr: float = field(default=6e-4, metadata=_flag("peak learning rate (default 6e-4)", float))
    min_lr_ratio: float = field(default=0.1, metadata=_flag("final lr as a fraction of the peak (default 0.1)", float))
    warmup_ratio: float = field(default=0.2, metadata=_flag("share of steps with linear warm-up (default 0.2)", float))
    weight_decay: float = field(default=0.01, metadata=_flag("AdamW weight decay, not on biases and norms", float))
    valid_data: str | None = field(default=None, metadata=_flag("packed prefix of held-out rows for validation"))
    valid_rows: int = field(
        default=0,
        metadata=_flag("validation rows: the first N of --valid-data, or else the last N of --data held out", int),
    )
    save_interval: int = field(
        default=1000, metadata=_flag("checkpoint (and validate, export) every N steps", int, minimum=1)
    )
    keep_last: int = field(default=0, metadata=_flag("keep only the newest K DeepSpeed checkpoints (0: all)", int))
    export_dtype: str = field(
        default="auto",
        metadata=_flag(
            "dtype of the transformers export of each checkpoint: auto = the training weights' "
            "(bfloat16 under the shipped configs); float32 = the optimizer's fp32 master weights",
            choices=("auto", "bfloat16", "float32"),
        ),
    )
    log_interval: int = field(default=1, metadata=_flag("log metrics every N steps", int, minimum=1))
    activation_checkpointing: bool = field(default=False, metadata=_flag("recompute layer activations in backward"))
    compile: bool = field(
        default=True,
        metadata=_flag(
            "do not torch.compile the layers (compiled by default on GPUs without --tp)", flag="--no-compile"
        ),
    )
    loss: str = field(
        default="auto",
        metadata=_flag(
            "loss implementation: auto = liger's fused linear cross-entropy on GPUs, full logits elsewhere",
            choices=("auto", "fused", "chunked", "logits"),
        ),
    )
    distill_from: str | None = field(
        default=None,
        metadata=_flag(
            "distill from this teacher (a checkpoint folder with the student's tokenizer, normally the base of "
            "--init): loss = (1 - A)·CE + A·T²·KL(teacher || student)"
        ),
    )
    distill_weight: float | None = field(
        default=None, metadata=_flag(f"A, the share of the KL term (default {DISTILL_WEIGHT})", float)
    )
    distill_temperature: float | None = field(
        default=None,
        metadata=_flag(
            f"T, the temperature of both distributions in the KL term (default {DISTILL_TEMPERATURE})", float
        ),
    )
    allow_other_tokenizer: bool = field(
        default=False,
        metadata=_flag("train although --data was packed with another tokenizer than --init's (recorded in the run)"),
    )
    seed: int = field(default=1234, metadata=_flag("model-side random seed", int))
    data_seed: int | None = field(
        default=None, metadata=_flag("shuffle rows with this seed (default: the packed order, as the paper)", int)
    )
    eval_tasks: str | None = field(
        default=None, metadata=_flag("lm-eval tasks to run at each checkpoint, e.g. arc_easy,lambada_openai,piqa,sciq")
    )
    eval_include_path: str | None = field(default=None, metadata=_flag("folder of extra lm-eval task YAMLs"))
    eval_limit: int | None = field(default=None, metadata=_flag("evaluate at most N documents per task", int))
    # set by the deepspeed launcher, spelt as it spells it
    local_rank: int = field(default=0, metadata=_flag(argparse.SUPPRESS, int, flag="--local_rank"))

    @classmethod
    def parser(cls, description: str | None = None) -> argparse.ArgumentParser:
        """The command line of these options: `--field-name` per field (booleans are switches)."""
        p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
        for f in dataclasses.fields(cls):
            meta = f.metadata
            name = _flag_name(f)
            if f.default is False or f.default is True:
                action = "store_true" if f.default is False else "store_false"
                p.add_argument(name, dest=f.name, action=action, help=meta["help"])
                continue
            kwargs = dict(dest=f.name, help=meta["help"])
            if meta["type"] is not None:
                kwargs["type"] = meta["type"]
            if "choices" in meta:
                kwargs["choices"] = meta["choices"]
            if f.default is dataclasses.MISSING:
                kwargs["required"] = True
            else:
                kwargs["default"] = f.default
            p.add_argument(name, **kwargs)
        return p

    @classmethod
    def from_argv(cls, argv=None, description: str | None = None) -> RunOptions:
        """Parse a command line; a value below a field's minimum is a usage error (exit code 2)."""
        p = cls.parser(description)
        args = p.parse_args(argv)
        for f in dataclasses.fields(cls):
            minimum = f.metadata.get("minimum")
            if minimum is not None and getattr(args, f.name) < minimum:
                p.error(f"{_flag_name(f)} must be >= {minimum}")
        return cls(**vars(args))
