"""The loss implementations agree with full-logit cross-entropy, values and gradients.

`fused` (liger's triton kernels) runs in triton's CPU interpreter: `test_fused_loss_in_the_cpu_interpreter`
runs this file's `interpreted` tests in a child pytest (`helpers.run_interpreted`)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import interpreted, interpreter_parent, random_mlkv, run_interpreted, tiny_config
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from megatron_mlkv.training.loss import (
    FusedLinearCrossEntropy,
    FusedLinearDistillation,
    chunked_cross_entropy,
    lm_loss_sum,
)

# `make test-compat` runs the tests marked compat (torch's checkpointing, the losses' torch operations); not
# the interpreted ones: triton 3.6's interpreter, which torch 2.11 pins, fails under numpy 2.4 (docs/versions.md)
compat = pytest.mark.compat


def head_and_targets():
    """hidden (37, 16), weight (50, 16), targets with three ignored, and their full-logit loss sum."""
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    targets[[3, 20, 36]] = -100
    return hidden, weight, targets, F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100, reduction="sum")


@compat
def test_chunked_cross_entropy_equals_full_logits():
    hidden, weight, targets, ref = head_and_targets()
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    got = chunked_cross_entropy(hidden, weight, targets, chunk_tokens=8)  # 5 chunks, the last partial
    grads = torch.autograd.grad(got, (hidden, weight))
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


@compat
@pytest.mark.parametrize("tie", [False, True])
def test_lm_loss_sum_chunked_equals_logits_for_the_model(tie):
    model = random_mlkv(tiny_config(tie_word_embeddings=tie).with_layout(2, 2), std=0.05).train()
    ids = torch.randint(0, 101, (3, 17))
    labels = ids.clone()
    labels[0, 10:] = -100  # padding carries no loss
    ref = lm_loss_sum(model, ids, labels, "logits")
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    got = lm_loss_sum(model, ids, labels, "chunked")
    grads = torch.autograd.grad(got, list(model.parameters()))
    expected = F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
    assert ref.item() == pytest.approx(expected.item(), rel=1e-6)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown"):
        lm_loss_sum(model, ids, labels, "magic")


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an operation returns while the mode is on (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def largest_tensor(loss_fn) -> int:
    with LargestTensor() as mode:
        loss_fn().backward()
    return mode.largest


@compat
def test_chunked_losses_never_hold_the_full_logits(monkeypatch):
    """Tensor accounting over forward and backward: the chunked cross-entropy and both chunked
    distillations keep logits of one chunk at a time; full logits (n x V) appear only with `logits`."""
    from megatron_mlkv.training import loss

    torch.manual_seed(0)
    n, vocab, d = 256, 512, 16
    hidden, weight = torch.randn(n, d, requires_grad=True), torch.randn(vocab, d, requires_grad=True)
    t_hidden, t_weight = torch.randn(n, d), torch.randn(vocab, d)
    targets = torch.randint(0, vocab, (n,))
    full = n * vocab
    assert largest_tensor(lambda: F.cross_entropy(hidden @ weight.T, targets, reduction="sum")) >= full
    assert largest_tensor(lambda: chunked_cross_entropy(hidden, weight, targets, chunk_tokens=32)) <= full // 8
    step = loss.chunk_tokens(n, vocab, d)  # FusedLinearDistillation's chunk
    assert step < n
    args = (hidden, weight, t_hidden, t_weight, targets, 0.5, 2.0)
    assert largest_tensor(lambda: FusedLinearDistillation.apply(*args)[0]) <= step * vocab < full
    # the model's: 8 rows of 32 tokens, 2,048 words; the chunked distillation's chunks of 16 tokens
    vocab = 2048
    monkeypatch.setattr(loss, "DISTILL_CHUNK_ELEMENTS", 16 * vocab)
    model = random_mlkv(tiny_config(vocab_size=vocab).with_layout(2, 2), std=0.05).train()
    teacher = random_mlkv(tiny_config(vocab_size=vocab), std=0.05).eval()
    ids = torch.randint(0, vocab, (8, 32))
    chunked = largest_tensor(lambda: loss.distill_loss_sums(model, teacher, ids, ids, 0.5, 2.0, "chunked")[0])
    whole = largest_tensor(lambda: loss.distill_loss_sums(model, teacher, ids, ids, 0.5, 2.0, "logits")[0])
    head = model.embed_out.weight.numel()  # its gradient: the largest tensor besides logits
    assert chunked <= max(16 * vocab, head) < 8 * 31 * vocab <= whole


@interpreter_parent
def test_fused_loss_in_the_cpu_interpreter():
    pytest.importorskip("liger_kernel")
    assert run_interpreted(__file__, "-k", "interpreted") == 2


@interpreted
def test_interpreted_fused_loss_scales_its_gradients_by_the_upstream_gradient():
    hidden, weight, targets, ref = head_and_targets()
    scale = 1 / 34  # the trainer's 1/tokens; liger's own backward special-cases 1.0
    ref_grads = torch.autograd.grad(ref * scale, (hidden, weight))
    got = FusedLinearCrossEntropy.apply(hidden, weight, targets)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(ref.item(), rel=1e-5)
    for g, r in zip(torch.autograd.grad(got * scale, (hidden, weight)), ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # validation: the loss alone
        assert FusedLinearCrossEntropy.apply(hidden, weight, targets).item() == pytest.approx(ref.item(), rel=1e-5)


@interpreted
def test_interpreted_lm_loss_sum_fused_equals_logits_for_the_model():
    model = random_mlkv(tiny_config().with_layout(2, 2), std=0.05).train()
    ids = torch.randint(0, 101, (3, 17))
    labels = ids.clone()
    labels[1, 12:] = -100
    ref = lm_loss_sum(model, ids, labels, "logits")
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    got = lm_loss_sum(model, ids, labels, "fused")
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    for g, r in zip(torch.autograd.grad(got, list(model.parameters())), ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
