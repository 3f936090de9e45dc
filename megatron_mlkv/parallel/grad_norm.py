"""Which rank counts which gradient in the global norm (the tags DeepSpeed reads), and the same rule
for plain PyTorch loops: `global_grad_norm`, `clip_grad_norm_`."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from .groups import group_rank, group_size

# --------------------------------------------------------------------------------------------------
# Parameter tags read by DeepSpeed's gradient norm
# --------------------------------------------------------------------------------------------------


def _tag(param: nn.Parameter, counted: bool, partition_dim: int) -> None:
    """Megatron/DeepSpeed attributes: `tensor_model_parallel`/`model_parallel` make every TP rank
    count this tensor in the global gradient norm (summed over the TP group)."""
    param.tensor_model_parallel = counted
    param.model_parallel = counted
    param.partition_dim = partition_dim
    param.partition_stride = 1


def is_tensor_parallel_param(param: torch.Tensor) -> bool:
    """DeepSpeed's `is_model_parallel_parameter` (0.19.8): either attribute truthy."""
    return bool(getattr(param, "model_parallel", False) or getattr(param, "tensor_model_parallel", False))


def counts_in_grad_norm(param: torch.Tensor, tp_rank: int) -> bool:
    """Whether this rank counts `param` in the global gradient norm (DeepSpeed's rule)."""
    return tp_rank == 0 or is_tensor_parallel_param(param)


# --------------------------------------------------------------------------------------------------
# Gradient norm and clipping (plain PyTorch loops, logging)
# --------------------------------------------------------------------------------------------------


def global_grad_norm(model: nn.Module, tp_group=None, norm_type: float = 2.0) -> torch.Tensor:
    """The norm of all gradients of the TP=1 model, from a parallelized one (collective over tp_group).

    Same rule as DeepSpeed: count p iff `is_tensor_parallel_param(p)` or TP rank 0, sum over the TP
    group. Assumes full (not ZeRO-partitioned) `.grad`s; under DeepSpeed use
    `engine.get_global_grad_norm()`, which applies this rule to its partitioned gradients.
    """
    rank = group_rank(tp_group)
    grads = [p.grad for p in model.parameters() if p.grad is not None and counts_in_grad_norm(p, rank)]
    device = next((g.device for g in grads), next(model.parameters()).device)
    if norm_type == math.inf:
        total = (
            torch.stack([g.detach().abs().max().float() for g in grads]).max()
            if grads
            else torch.zeros((), device=device)
        )
        if group_size(tp_group) > 1:
            dist.all_reduce(total, op=dist.ReduceOp.MAX, group=tp_group)
        return total
    total = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        total += torch.linalg.vector_norm(g.detach().float(), norm_type) ** norm_type
    if group_size(tp_group) > 1:
        dist.all_reduce(total, group=tp_group)
    return total ** (1.0 / norm_type)


def clip_grad_norm_(model: nn.Module, max_norm: float, tp_group=None, norm_type: float = 2.0) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for a parallelized model: scale all grads by
    min(1, max_norm / (global norm + 1e-6)); returns the global norm (before clipping)."""
    norm = global_grad_norm(model, tp_group, norm_type)
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.detach().mul_(coef.to(p.grad.device, p.grad.dtype))
    return norm
