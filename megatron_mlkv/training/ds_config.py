"""The DeepSpeed JSON config of a run: read, checked against the world and TP sizes, completed.

Division of labour: the DeepSpeed config owns batch size, ZeRO stage, precision and gradient
clipping; the trainer owns the model, the data order, the optimizer hyper-parameters and the
schedule."""

from __future__ import annotations

import json

from ..errors import UptrainError


def load_ds_config(path: str, world_size: int, tp_size: int) -> dict:
    """Read and check a DeepSpeed config; fill `train_batch_size` and the gradient accumulation.

    Returns the dict to hand to `deepspeed.initialize`. A contradiction (batch sizes that do not
    multiply out, bf16 and fp16 both on, ZeRO-3 with tensor parallelism) is an `UptrainError`.
    """
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise UptrainError(f"--ds_config {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise UptrainError(f"--ds_config {path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(cfg, dict):
        raise UptrainError(f"--ds_config {path}: expected a JSON object")
    if world_size % tp_size:
        raise UptrainError(f"--tp {tp_size} must divide the number of ranks {world_size}")
    dp = world_size // tp_size
    micro = cfg.get("train_micro_batch_size_per_gpu")
    gas = cfg.get("gradient_accumulation_steps")
    total = cfg.get("train_batch_size")
    for key, value in (
        ("train_micro_batch_size_per_gpu", micro),
        ("gradient_accumulation_steps", gas),
        ("train_batch_size", total),
    ):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise UptrainError(f"--ds_config {path}: {key} = {value!r} must be a positive integer")
    if micro is None and (total is None or gas is None):
        if total is None:
            raise UptrainError(f"--ds_config {path}: set train_micro_batch_size_per_gpu (or train_batch_size)")
        gas = gas or 1
    if micro is None:
        if total % (gas * dp):
            raise UptrainError(
                f"--ds_config {path}: train_batch_size {total} is not divisible by "
                f"gradient_accumulation_steps {gas} x {dp} data-parallel ranks"
            )
        micro = total // (gas * dp)
    if gas is None:
        gas = 1 if total is None else total // (micro * dp)
        if gas < 1 or (total is not None and total % (micro * dp)):
            raise UptrainError(
                f"--ds_config {path}: train_batch_size {total} is not a multiple of "
                f"micro-batch {micro} x {dp} data-parallel ranks"
            )
    if total is not None and total != micro * gas * dp:
        raise UptrainError(
            f"--ds_config {path}: train_batch_size {total} != train_micro_batch_size_per_gpu "
            f"{micro} x gradient_accumulation_steps {gas} x {dp} data-parallel ranks"
        )
    bf16 = cfg.get("bf16", {}).get("enabled", False)
    fp16 = cfg.get("fp16", {}).get("enabled", False)
    if bf16 and fp16:
        raise UptrainError(f"--ds_config {path}: bf16 and fp16 are both enabled; choose one")
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise UptrainError(f"--ds_config {path}: zero_optimization.stage = {stage!r}; allowed 0, 1, 2, 3")
    if stage == 3 and tp_size > 1:
        raise UptrainError(
            f"--ds_config {path}: ZeRO stage 3 cannot be combined with --tp {tp_size}; "
            f"use zero1.json or zero2.json with tensor parallelism"
        )
    if "optimizer" in cfg or "scheduler" in cfg:
        raise UptrainError(
            f"--ds_config {path}: remove the 'optimizer'/'scheduler' sections; uptrain.py "
            f"owns them (--lr, --weight-decay, --warmup-ratio)"
        )
    cfg.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=gas, train_batch_size=micro * gas * dp)
    cfg.setdefault("gradient_clipping", 1.0)
    cfg.setdefault("steps_per_print", 10**9)
    return cfg
