"""Next-token loss of a causal LM without materialising full-vocabulary float32 logits.

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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import parallel as tp

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
