"""Vocabulary-parallel losses: each rank holds V/T logit columns; full-vocabulary logits are never formed.

Cross-entropy costs two all-reduces of a few numbers per token; distillation (cross-entropy plus the KL
divergence from a teacher's logits, sharded alike) three. With no group both are plain single-process
losses, so one implementation serves TP and TP = 1."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .groups import group_size


def _all_reduce(t: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


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


# --------------------------------------------------------------------------------------------------
# Vocabulary-parallel distillation: cross-entropy and KL(teacher || student) at a temperature
# --------------------------------------------------------------------------------------------------


def _valid_columns(local_v: int, vocab_start: int, vocab_size: int | None) -> int:
    return local_v if vocab_size is None else max(0, min(local_v, vocab_size - vocab_start))


def _masked(x: torch.Tensor, n_valid: int) -> torch.Tensor:
    """float32 copy of logits x (N, V_local) with the padded columns at -inf."""
    x = x.float().clone()
    if n_valid < x.shape[-1]:
        x[..., n_valid:] = float("-inf")
    return x


def distill_stats(student, teacher, targets, temperature: float, group=None, vocab_start=0, vocab_size=None):
    """Per-token softmax statistics of student logits z and teacher logits t (N, V_local) over the
    whole vocabulary (three all-reduces of (k, N) over `group`), and from them, per token (N,):

        ce = log Σ exp(z) - z[target]                       (cross-entropy at temperature 1)
        kl = Σ_v p_v (log p_v - log q_v),  p = softmax(t/T), q = softmax(z/T)

    both 0 where target is -100. Returns (ce, kl, stats); `distill_logit_grad` turns the stats into
    the gradient without further communication."""
    n_valid = _valid_columns(student.shape[-1], vocab_start, vocab_size)
    z, t = _masked(student, n_valid), _masked(teacher, n_valid)
    maxes = _all_reduce(torch.stack([z.max(dim=-1).values, t.max(dim=-1).values]), group, dist.ReduceOp.MAX)
    m, mt = maxes[0], maxes[1]
    ignored = targets == -100
    local_t = targets.long() - vocab_start
    here = (local_t >= 0) & (local_t < n_valid) & ~ignored
    index = local_t.masked_fill(~here, 0).unsqueeze(-1)
    z_target = z.gather(-1, index).squeeze(-1).masked_fill(~here, 0.0)
    zs = z - m.unsqueeze(-1)
    ts = (t - mt.unsqueeze(-1)) / temperature
    et = ts.exp()
    sums = torch.stack([zs.exp().sum(-1), (zs / temperature).exp().sum(-1), et.sum(-1), z_target])
    s1, st, s_teacher, z_target = _all_reduce(sums, group)
    p = et / s_teacher.unsqueeze(-1)
    # Σ p (t - z) / T, over valid columns only (padded ones are -inf in both)
    diff = (t - z).masked_fill(~torch.isfinite(t), 0.0) if n_valid < t.shape[-1] else t - z
    cross = _all_reduce((p * diff).sum(-1) / temperature, group)
    ce = (s1.log() + m - z_target).masked_fill(ignored, 0.0)
    kl = (cross - (mt - m) / temperature - s_teacher.log() + st.log()).masked_fill(ignored, 0.0)
    return ce, kl, (m, mt, s1, st, s_teacher, n_valid)


def distill_logit_grad(student, teacher, targets, temperature, stats, grad_ce, grad_kl, vocab_start=0):
    """d(Σ grad_ce·ce + grad_kl·kl)/dz for `distill_stats`'s per-token terms, float32 (N, V_local):

        grad_ce·(softmax(z) - onehot(target)) + grad_kl·(softmax(z/T) - softmax(t/T)) / T

    grad_ce, grad_kl (N,) are the upstream gradients of the two terms (ignored tokens get none)."""
    m, mt, s1, st, s_teacher, n_valid = stats
    z, t = _masked(student, n_valid), _masked(teacher, n_valid)
    ignored = targets == -100
    g_ce = grad_ce.float().masked_fill(ignored, 0.0).unsqueeze(-1)
    g_kl = (grad_kl.float().masked_fill(ignored, 0.0) / temperature).unsqueeze(-1)
    zs = z - m.unsqueeze(-1)
    grad = g_ce * zs.exp() / s1.unsqueeze(-1)
    q = (zs / temperature).exp() / st.unsqueeze(-1)
    p = ((t - mt.unsqueeze(-1)) / temperature).exp() / s_teacher.unsqueeze(-1)
    grad += g_kl * (q - p)
    local_t = targets.long() - vocab_start
    here = (local_t >= 0) & (local_t < n_valid) & ~ignored
    index = local_t.masked_fill(~here, 0).unsqueeze(-1)
    return grad.scatter_add(-1, index, -(g_ce * here.unsqueeze(-1)))


class _VocabParallelDistillation(torch.autograd.Function):
    """Per-token (ce, kl) from vocabulary-sharded student and teacher logits; the teacher gets no gradient."""

    @staticmethod
    def forward(ctx, student, teacher, targets, temperature, group, vocab_start, vocab_size):
        ce, kl, stats = distill_stats(student, teacher, targets, temperature, group, vocab_start, vocab_size)
        ctx.save_for_backward(student, teacher, targets, *stats[:5])
        ctx.n_valid, ctx.temperature, ctx.vocab_start = stats[5], temperature, vocab_start
        return ce, kl

    @staticmethod
    def backward(ctx, grad_ce, grad_kl):
        student, teacher, targets, *stats = ctx.saved_tensors
        zeros = torch.zeros_like(targets, dtype=torch.float32)
        grad = distill_logit_grad(
            student,
            teacher,
            targets,
            ctx.temperature,
            (*stats, ctx.n_valid),
            zeros if grad_ce is None else grad_ce,
            zeros if grad_kl is None else grad_kl,
            ctx.vocab_start,
        )
        return grad.to(student.dtype), None, None, None, None, None, None


def vocab_parallel_distillation(
    student_local: torch.Tensor,
    teacher_local: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    group=None,
    vocab_start: int = 0,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy and KL(teacher || student) at `temperature`, from this rank's vocabulary
    columns of both models' logits (N, V_local), sharded alike; targets (N,) global ids, -100 for
    tokens without a loss. Returns float32 (ce, kl), each (N,), identical on every rank, 0 where
    ignored; differentiable in the student's logits only."""
    return _VocabParallelDistillation.apply(
        student_local, teacher_local, targets, temperature, group, vocab_start, vocab_size
    )
