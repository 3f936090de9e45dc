"""The four region functions (Megatron-core's mappings), each with its process group passed explicitly.

Named for where data goes: copy_to_region (forward identity, backward all-reduce),
reduce_from_region (forward all-reduce, backward identity), scatter_to_region and
gather_from_region (split or gather the last dimension)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .groups import TensorParallelError, group_rank, group_size

# --------------------------------------------------------------------------------------------------
# The four region functions (megatron-core mappings), each with its group passed explicitly
# --------------------------------------------------------------------------------------------------


class _CopyToRegion(torch.autograd.Function):
    """Forward identity, backward all-reduce (sum) of the gradient over `group`."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()  # never modify an incoming gradient in place
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromRegion(torch.autograd.Function):
    """Forward all-reduce (sum) over `group`, backward identity."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _split_last(x: torch.Tensor, group) -> torch.Tensor:
    size, rank = group_size(group), group_rank(group)
    if x.shape[-1] % size:
        raise TensorParallelError(f"last dim {x.shape[-1]} is not divisible by the group size T = {size}")
    return x.chunk(size, dim=-1)[rank].contiguous()


def _gather_last(x: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(group_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


class _ScatterToRegion(torch.autograd.Function):
    """Forward: keep this rank's chunk of the last dim; backward: all-gather along the last dim."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group), None


class _GatherFromRegion(torch.autograd.Function):
    """Forward: all-gather along the last dim; backward: keep this rank's chunk."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


def copy_to_region(x: torch.Tensor, group) -> torch.Tensor:
    """Enter a parallel region: identity forward, all-reduce of the gradient backward (any shape)."""
    return x if group_size(group) == 1 else _CopyToRegion.apply(x, group)


def reduce_from_region(x: torch.Tensor, group) -> torch.Tensor:
    """Leave a row-parallel region: all-reduce (sum) forward, identity backward (any shape)."""
    return x if group_size(group) == 1 else _ReduceFromRegion.apply(x, group)


def scatter_to_region(x: torch.Tensor, group) -> torch.Tensor:
    """(..., n) -> (..., n/T), this rank's chunk; backward all-gathers."""
    return x if group_size(group) == 1 else _ScatterToRegion.apply(x, group)


def gather_from_region(x: torch.Tensor, group) -> torch.Tensor:
    """(..., n/T) -> (..., n), the rank-ordered concatenation; backward keeps this rank's chunk."""
    return x if group_size(group) == 1 else _GatherFromRegion.apply(x, group)
