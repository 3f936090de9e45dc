"""Uptraining with DeepSpeed: the loop behind `deepspeed launch/uptrain.py`.

Files: options.py (`RunOptions`: the run's flags), ds_config.py (the DeepSpeed JSON, checked),
optim.py (parameter groups and schedule), engine.py (`LossModel`, compiled layers, `make_engine`),
loss.py (the next-token loss without full logits), distill.py (the teacher and its loss), float8.py
(`--fp8`: the blocks' linear layers in float8, torchao), packing.py
(each layer's parameters as two flat tensors for DeepSpeed), deepspeed_patches.py, metrics.py
(metrics.jsonl, TensorBoard, MFU), plan.py (`RunPlan`: the options checked before any process group
exists), run_dir.py (which checkpoint folders are complete and intact), checkpointer.py
(`Checkpointer`: choose, resume, save, prune), trainer.py (`Trainer`: the run, holding its plan and
checkpointer).
"""

from .ds_config import load_ds_config
from .engine import LossModel, compile_blocks, make_engine
from .optim import lr_factor, param_groups
from .plan import RunPlan
from .trainer import NonFiniteLoss, Trainer, main

__all__ = [
    "NonFiniteLoss",
    "load_ds_config",
    "LossModel",
    "compile_blocks",
    "make_engine",
    "lr_factor",
    "param_groups",
    "RunPlan",
    "Trainer",
    "main",
]
