"""Uptraining with DeepSpeed: the loop behind `deepspeed launch/uptrain.py`.

Files: ds_config.py (the DeepSpeed JSON, checked), optim.py (parameter groups and schedule),
engine.py (`LossModel`, compiled layers, `make_engine`), loss.py (the next-token loss without full
logits), packing.py (each layer's parameters as two flat tensors for DeepSpeed),
deepspeed_patches.py, run_dir.py (checkpoint folders), integrity.py (manifests and checksums),
metrics.py (metrics.jsonl, TensorBoard, MFU), trainer.py (`RunPlan`: the options checked before any
process group exists; `Trainer`: the run).
"""

from .ds_config import UptrainError, load_ds_config
from .engine import LossModel, compile_blocks, make_engine
from .optim import lr_factor, param_groups
from .trainer import NonFiniteLoss, RunPlan, Trainer, main

__all__ = [
    "UptrainError",
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
