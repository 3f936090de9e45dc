"""The loss implementations agree with full-logit cross-entropy, values and gradients.

`fused` (liger's triton kernels) runs in triton's CPU interpreter: `test_fused_loss_in_the_cpu_interpreter`
runs this file's `interpreted` tests in a child pytest (`helpers.run_interpreted`)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import interpreted, interpreter_parent, random_mlkv, run_interpreted, tiny_config

from megatron_mlkv.training.loss import FusedLinearCrossEntropy, chunked_cross_entropy, lm_loss_sum


def head_and_targets():
    """hidden (37, 16), weight (50, 16), targets with three ignored, and their full-logit loss sum."""
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    targets[[3, 20, 36]] = -100
    return hidden, weight, targets, F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100, reduction="sum")


def test_chunked_cross_entropy_equals_full_logits():
    hidden, weight, targets, ref = head_and_targets()
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    got = chunked_cross_entropy(hidden, weight, targets, chunk_tokens=8)  # 5 chunks, the last partial
    grads = torch.autograd.grad(got, (hidden, weight))
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


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


@interpreter_parent
def test_fused_loss_in_the_cpu_interpreter():
    pytest.importorskip("liger_kernel")
    assert "2 passed" in run_interpreted(__file__, "-k", "interpreted")


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
