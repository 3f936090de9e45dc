"""Next-token loss of a causal LM without materialising full-vocabulary float32 logits, alone
(`lm_loss_sum`) or with distillation from a teacher (`distill_loss_sums`).

With a 50k vocabulary, float32 logits of a (12 x 2048) micro-batch are 5 GB, more than the 160M
model's activations, and writing/reading them is a good share of a step. Three implementations
of the same sum of token losses:

    fused    liger-kernel's fused linear cross-entropy (GPU): the head matmul, softmax and its
             gradient in chunks, the gradients computed during the forward (see
             `FusedLinearCrossEntropy` for why not through liger's own autograd function)
    chunked  plain PyTorch: the head and the loss per chunk of tokens, recomputed in backward
             (works everywhere; the CPU reference for `fused`)
    logits   the model's full logits, then cross-entropy (needed for tensor parallelism, whose
             vocabulary-parallel cross-entropy works on each rank's logit columns)

`fused` and `chunked` read the output layer's weight outside its forward; under ZeRO-3 the
trainer registers it as an external parameter (`engine.LossModel`).

Distillation adds the teacher's logits, so the same three exist for `(1 - A)·CE + A·T²·KL(teacher ||
student)`; all compute both terms with `parallel.distill_stats` (the per-token softmax statistics)
and `parallel.distill_logit_grad` (the gradient from them):

    fused    (GPU, TP = 1) per chunk of tokens: both heads' logits in float32, the loss and its
             gradient in one compiled function, the gradients of hidden states and head computed
             during the forward (`FusedLinearDistillation`); liger's fused distillation losses do
             not fit: its JSD kernel takes no CE term (so the student's logits would be made twice),
             and its KL kernel takes the teacher's probabilities for the whole batch
    chunked  chunks of tokens through `vocab_parallel_distillation`, recomputed in backward (works
             with TP: each rank's vocabulary columns of both models, sharded alike)
    logits   both models' full logits, then `vocab_parallel_distillation`
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import parallel as tp
from ..parallel.cross_entropy import distill_logit_grad, distill_stats

IMPLEMENTATIONS = ("auto", "fused", "chunked", "logits")
# `fused` holds logits for at most FUSED_CHUNK_MEM · tokens · hidden elements at a time. liger's
# default (1) splits a Pythia-160M micro-batch of 12 x 2048 tokens into 48 chunks, whose launches
# cost the host more time than the GPU needs for them; 8 gives 6 chunks (logits of 4,096 tokens,
# 0.4 GB in bf16).
FUSED_CHUNK_MEM = 8


def fused_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import liger_kernel.transformers.functional  # noqa: F401
    except ImportError:
        return False
    return True


class FusedLinearCrossEntropy(torch.autograd.Function):
    """liger's fused forward, which also computes the gradients, with a backward that scales them by
    the upstream gradient on the GPU. liger's own backward first compares that gradient with 1.0 on
    the host (two synchronisations a step, and the trainer's upstream gradient is 1/tokens, so it
    scales anyway; what it bought: benchmarks/README.md, changelog)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets):
        from liger_kernel.ops.fused_linear_cross_entropy import fused_linear_cross_entropy_forward

        loss, *_, grad_hidden, grad_weight, _ = fused_linear_cross_entropy_forward(
            hidden,
            weight,
            targets,
            ignore_index=-100,
            reduction="sum",
            compute_gradients=ctx.needs_input_grad[0],
            weight_requires_grad=ctx.needs_input_grad[1],
            chunk_mem_const=FUSED_CHUNK_MEM,
        )
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss.float()

    @staticmethod
    def backward(ctx, grad):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = lambda g: None if g is None else (g.float() * grad).to(g.dtype)  # noqa: E731 (float32 scale, as liger's)
        return scale(grad_hidden), scale(grad_weight), None


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=-100, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = 4096
) -> torch.Tensor:
    """sum over tokens of CE(hidden @ weightᵀ, targets): hidden (n, d), weight (V, d), targets (n,)
    with -100 ignored. Logits exist for one chunk at a time, in forward and in backward."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        h, t = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        total = total + checkpoint(_chunk_loss, h, weight, t, use_reentrant=False)
    return total


def lm_loss_sum(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Sum of next-token losses of `model` (an `MLKVTransformer`, possibly tensor-parallel) over the
    tokens whose label is not -100: position t predicts labels[:, t + 1]. Float32 scalar."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"loss implementation '{impl}' unknown; allowed: {', '.join(IMPLEMENTATIONS)}")
    if impl == "auto":
        impl = "fused" if fused_available() else "logits"
    if getattr(model, "tp_plan", None) is not None or impl == "logits":
        logits = model(input_ids)
        return tp.token_losses(model, logits[:, :-1], labels[:, 1:]).sum()
    hidden = model.hidden_states(input_ids)[:, :-1].reshape(-1, model.config.hidden_size)
    targets = labels[:, 1:].reshape(-1)
    weight = model.embed_out.weight
    if impl == "fused":
        return FusedLinearCrossEntropy.apply(hidden, weight, targets)
    return chunked_cross_entropy(hidden, weight, targets)


# --------------------------------------------------------------------------------------------------
# Distillation: (1 - A)·CE + A·T²·KL(teacher || student)
# --------------------------------------------------------------------------------------------------

# chunked distillation holds a few (tokens x vocabulary) float32 tensors per chunk: 2^24 elements each
DISTILL_CHUNK_ELEMENTS = 1 << 24


def _mm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with a float32 result: 16-bit operands keep the tensor cores and lose nothing to a
    16-bit output (`out_dtype`, CUDA); elsewhere both are cast up."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and b.dtype == a.dtype:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _fused_chunk(z, t, targets, temperature: float, w_ce: float, w_kl: float):
    """One chunk of `FusedLinearDistillation`: the summed terms and d(w_ce·CE + w_kl·KL)/dz."""
    ce, kl, stats = distill_stats(z, t, targets, temperature)
    ones = torch.ones_like(ce)
    grad = distill_logit_grad(z, t, targets, temperature, stats, ones * w_ce, ones * w_kl)
    return ce.sum(), kl.sum(), grad


_COMPILED_CHUNK = {}


def _chunk_fn(device: torch.device, compiled: bool):
    """`_fused_chunk`, compiled on GPUs (one kernel family instead of a dozen passes over the logits)."""
    if device.type != "cuda" or not compiled:
        return _fused_chunk
    if "cuda" not in _COMPILED_CHUNK:
        _COMPILED_CHUNK["cuda"] = torch.compile(_fused_chunk, dynamic=False)
    return _COMPILED_CHUNK["cuda"]


def chunk_tokens(n: int, vocab: int, hidden: int) -> int:
    """Tokens per chunk of the fused losses: logits of at most FUSED_CHUNK_MEM · n · hidden elements
    at a time, a power of two (the chunks share compiled kernels)."""
    pieces = -(-vocab // (FUSED_CHUNK_MEM * hidden))
    return min(n, 1 << max(0, (-(-n // pieces) - 1).bit_length()))


class FusedLinearDistillation(torch.autograd.Function):
    """sum of (1 - A)·CE + A·T²·KL over label tokens from the hidden states of student (n, d) and
    teacher (n, d_t) and their output layers (V, d), (V, d_t); returns (loss, ce, kl) float32 sums,
    differentiable in the student's hidden states and head only. The gradients are computed chunk by
    chunk during the forward (no logits kept), scaled by the upstream gradient in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, t_hidden, t_weight, targets, weight_kd: float, temperature: float, compiled=True):
        n = hidden.shape[0]
        step = chunk_tokens(n, weight.shape[0], hidden.shape[1])
        grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        ce_sum = hidden.new_zeros((), dtype=torch.float32)
        kl_sum = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if grads else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if grads else None
        w_ce, w_kl = 1.0 - weight_kd, weight_kd * temperature**2
        chunk = _chunk_fn(hidden.device, compiled)
        for start in range(0, n, step):
            h, y = hidden[start : start + step], targets[start : start + step]
            z = _mm_float32(h, weight.t())
            t = _mm_float32(t_hidden[start : start + step], t_weight.t())
            if not grads:
                ce, kl, _ = distill_stats(z, t, y, temperature)
                ce_sum += ce.sum()
                kl_sum += kl.sum()
                continue
            ce, kl, grad_z = chunk(z, t, y, temperature, w_ce, w_kl)
            ce_sum += ce
            kl_sum += kl
            grad_z = grad_z.to(hidden.dtype)
            grad_hidden[start : start + step] = grad_z @ weight
            grad_weight += _mm_float32(grad_z.t(), h)
        loss = w_ce * ce_sum + w_kl * kl_sum
        if grads:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        ctx.mark_non_differentiable(ce_sum, kl_sum)
        return loss, ce_sum, kl_sum

    @staticmethod
    def backward(ctx, grad, _grad_ce, _grad_kl):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = lambda g: (g.float() * grad).to(g.dtype)  # noqa: E731 (as FusedLinearCrossEntropy)
        return scale(grad_hidden), scale(grad_weight), None, None, None, None, None, None


def _distill_chunk(student_head, teacher_head, hidden, t_hidden, targets, temperature, plan):
    """(ce, kl) sums of one chunk: both heads' logits, then `vocab_parallel_distillation`."""
    with torch.no_grad():
        t_logits = teacher_head(t_hidden)
    args = (plan.group, plan.vocab_start, plan.config.vocab_size) if plan is not None else ()
    ce, kl = tp.vocab_parallel_distillation(student_head(hidden), t_logits, targets, temperature, *args)
    return torch.stack([ce.sum(), kl.sum()])


def distill_loss_sums(
    model: nn.Module,
    teacher: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    weight: float,
    temperature: float,
    impl: str = "auto",
    compiled: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce, kl): float32 sums over the tokens whose label is not -100 (position t predicts
    labels[:, t + 1]) of loss = (1 - A)·CE + A·T²·KL(teacher || student at temperature T), A =
    `weight`, T = `temperature`, with the CE and KL terms themselves (detached) beside it. `model`
    and `teacher` are `MLKVTransformer`s with one vocabulary, tensor-parallel alike or not at all;
    the teacher gets no gradient. With A = 0 the loss is `lm_loss_sum`'s. `compiled`: the fused
    implementation's elementwise part is compiled (on GPUs)."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"loss implementation '{impl}' unknown; allowed: {', '.join(IMPLEMENTATIONS)}")
    plan = getattr(model, "tp_plan", None)
    if impl == "auto":
        impl = "logits" if not input_ids.is_cuda else "chunked" if plan is not None else "fused"
    if impl == "fused" and plan is not None:
        impl = "chunked"  # the fused path has no vocabulary-parallel form
    targets = labels[:, 1:].reshape(-1)
    with torch.no_grad():
        t_hidden = teacher.hidden_states(input_ids)[:, :-1].reshape(targets.shape[0], -1)
    hidden = model.hidden_states(input_ids)[:, :-1].reshape(targets.shape[0], -1)
    w_ce, w_kl = 1.0 - weight, weight * temperature**2
    if impl == "fused":
        return FusedLinearDistillation.apply(
            hidden, model.embed_out.weight, t_hidden, teacher.embed_out.weight, targets, weight, temperature, compiled
        )
    # the head of a TP model is its ColumnParallelLinear; otherwise the weight, read outside the head's
    # forward as the CE losses do (ZeRO-3 gathers it as an external parameter)
    head = model.embed_out if plan is not None else lambda h: F.linear(h, model.embed_out.weight)
    if impl == "logits":
        sums = _distill_chunk(head, teacher.embed_out, hidden, t_hidden, targets, temperature, plan)
    else:
        local_vocab = plan.local_vocab_size if plan is not None else model.config.vocab_size
        step = max(1, DISTILL_CHUNK_ELEMENTS // local_vocab)
        sums = hidden.new_zeros(2, dtype=torch.float32)
        for start in range(0, targets.shape[0], step):
            piece = slice(start, start + step)
            sums = sums + checkpoint(
                _distill_chunk,
                head,
                teacher.embed_out,
                hidden[piece],
                t_hidden[piece],
                targets[piece],
                temperature,
                plan,
                use_reentrant=False,
            )
    ce, kl = sums[0], sums[1]
    return w_ce * ce + w_kl * kl, ce.detach(), kl.detach()
