"""Vocabulary-parallel cross-entropy: each rank holds V/T logit columns; full-vocabulary logits are
never formed (two all-reduces of one number per token, and one of the target's logit)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .groups import group_size

# --------------------------------------------------------------------------------------------------
# Vocabulary-parallel cross-entropy
# --------------------------------------------------------------------------------------------------


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token CE from vocabulary-sharded logits; only (N,)-sized tensors are all-reduced."""

    @staticmethod
    def forward(ctx, logits, targets, group, vocab_start, vocab_size, ignore_index):
        local_v = logits.shape[-1]
        x = logits.float()
        x = x.clone() if x is logits else x  # float32 input: never modify the caller's logits
        n_valid = local_v if vocab_size is None else max(0, min(local_v, vocab_size - vocab_start))
        if n_valid < local_v:  # padded vocabulary rows: excluded from the softmax
            x[..., n_valid:] = float("-inf")
        x_max = x.max(dim=-1).values
        if group_size(group) > 1:
            dist.all_reduce(x_max, op=dist.ReduceOp.MAX, group=group)
        x.sub_(x_max.unsqueeze(-1))
        ignored = targets == ignore_index
        local_t = targets.long() - vocab_start
        here = (local_t >= 0) & (local_t < n_valid) & ~ignored
        index = local_t.masked_fill(~here, 0).unsqueeze(-1)
        target_logit = x.gather(-1, index).squeeze(-1).masked_fill(~here, 0.0)
        x.exp_()
        stats = torch.stack([x.sum(dim=-1), target_logit])  # (2, ...): one all-reduce for both
        if group_size(group) > 1:
            dist.all_reduce(stats, group=group)
        sum_exp, target_logit = stats[0], stats[1]
        loss = (torch.log(sum_exp) - target_logit).masked_fill(ignored, 0.0)
        x.div_(sum_exp.unsqueeze(-1))  # softmax over the full vocabulary, this rank's columns
        ctx.save_for_backward(x, index, here, ignored)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, index, here, ignored = ctx.saved_tensors
        grad = softmax.scatter_add(-1, index, -here.unsqueeze(-1).to(softmax.dtype))
        grad.mul_(grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None, None, None


def vocab_parallel_cross_entropy(
    logits_local: torch.Tensor,
    targets: torch.Tensor,
    group=None,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Per-token cross-entropy without ever forming full-vocabulary logits.

    logits_local (..., V_local): this rank's vocabulary columns [vocab_start, vocab_start + V_local)
    (any float dtype; computed in float32). targets (...) global token ids, `ignore_index` for
    tokens without a loss (mask with `targets.masked_fill(~mask, -100)`). `vocab_size`: the true
    vocabulary; columns at or beyond it (padding) are excluded. Returns float32 losses (...),
    identical on every rank of `group`, 0 where ignored (gradient 0 there too); reduce them as
    with `F.cross_entropy(..., reduction='none')`. Costs two all-reduces of (...)-sized tensors.
    """
    return _VocabParallelCrossEntropy.apply(logits_local, targets, group, vocab_start, vocab_size, ignore_index)
