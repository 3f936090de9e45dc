"""Distillation's loss against a direct computation from both models' logits (`F.cross_entropy`,
`F.kl_div`), its gradients against autograd of that formula, and its checks of the teacher.

The runs (`launch/uptrain.py --distill-from`: resume, TP=2) are in test_uptrain.py; TP against one
process in test_tensor_parallel.py; the engine under ZeRO-2/3 in test_engine.py."""

import pytest
import torch
import torch.nn.functional as F
from helpers import random_mlkv, tiny_config

from megatron_mlkv import parallel as tp
from megatron_mlkv.training.loss import FusedLinearDistillation, chunk_tokens, distill_loss_sums, lm_loss_sum

IMPLS = ("logits", "chunked", "fused")


def reference_terms(student_logits, teacher_logits, targets, temperature):
    """Per-token CE and KL(teacher || student) at `temperature`, the textbook way (float64)."""
    s, t = student_logits.double(), teacher_logits.double()
    ce = F.cross_entropy(s, targets, ignore_index=-100, reduction="none")
    log_q, log_p = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).masked_fill(targets == -100, 0.0)
    return ce, kl


def logits_and_targets(n=23, v=37, seed=0):
    gen = torch.Generator().manual_seed(seed)
    student = (3 * torch.randn(n, v, generator=gen)).requires_grad_()
    teacher = 3 * torch.randn(n, v, generator=gen)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[[1, 7, 22]] = -100
    return student, teacher, targets


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_distillation_terms_and_gradients_equal_the_formula(temperature):
    student, teacher, targets = logits_and_targets()
    ce, kl = tp.vocab_parallel_distillation(student, teacher, targets, temperature)
    ref_ce, ref_kl = reference_terms(student, teacher, targets, temperature)
    torch.testing.assert_close(ce.double(), ref_ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl.double(), ref_kl, rtol=1e-4, atol=1e-5)
    assert ce.dtype == kl.dtype == torch.float32 and (ref_kl[targets != -100] > 0.1).all()  # far apart
    assert (ce[targets == -100] == 0).all() and (kl[targets == -100] == 0).all()
    gen = torch.Generator().manual_seed(1)
    up_ce, up_kl = torch.rand(23, generator=gen), torch.rand(23, generator=gen)  # any upstream gradients
    grad = torch.autograd.grad((up_ce * ce + up_kl * kl).sum(), student)[0]
    ref_grad = torch.autograd.grad((up_ce.double() * ref_ce + up_kl.double() * ref_kl).sum(), student)[0]
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)
    assert (grad[targets == -100] == 0).all()


def test_padded_vocabulary_columns_are_left_out():
    """Columns at or beyond vocab_size (TP's padding) hold garbage: they change nothing."""
    student, teacher, targets = logits_and_targets(v=37)
    padded = torch.cat([student, 50 * torch.ones(23, 3)], dim=-1)
    ce, kl = tp.vocab_parallel_distillation(
        padded, torch.cat([teacher, -9 * torch.ones(23, 3)], -1), targets, 2.0, vocab_size=37
    )
    ref_ce, ref_kl = reference_terms(student, teacher, targets, 2.0)
    torch.testing.assert_close(ce.double(), ref_ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl.double(), ref_kl, rtol=1e-4, atol=1e-5)
    grad = torch.autograd.grad(ce.sum() + kl.sum(), padded)[0]
    assert (grad[:, 37:] == 0).all()


def models(tie=False):
    """A student in an MLKV layout and a multi-head teacher of the same shape, far from uniform attention."""
    student = random_mlkv(tiny_config(tie_word_embeddings=tie).with_layout(2, 1), seed=0, std=0.2).train()
    teacher = random_mlkv(tiny_config(tie_word_embeddings=tie), seed=5, std=0.2).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 101, (3, 17), generator=gen)
    labels = ids.clone()
    labels[0, 10:] = -100  # padding carries no loss
    return student, teacher, ids, labels


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("impl", IMPLS)
def test_every_implementation_equals_the_formula_on_the_models(impl, tie):
    """loss = (1 - A)·CE + A·T²·KL summed over label tokens: value, terms and the student's gradients
    against autograd of the formula on both models' full logits; the teacher gets no gradient."""
    student, teacher, ids, labels = models(tie)
    weight, temperature = 0.3, 2.0
    targets = labels[:, 1:].flatten()
    ce, kl = reference_terms(student(ids)[:, :-1].flatten(0, 1), teacher(ids)[:, :-1].flatten(0, 1), targets, 2.0)
    ref = (1 - weight) * ce.sum() + weight * temperature**2 * kl.sum()
    ref_grads = torch.autograd.grad(ref, list(student.parameters()))
    loss, got_ce, got_kl = distill_loss_sums(student, teacher, ids, labels, weight, temperature, impl)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert got_ce.item() == pytest.approx(ce.sum().item(), rel=1e-5)
    assert got_kl.item() == pytest.approx(kl.sum().item(), rel=1e-4) and kl.sum() > 1.0
    assert not got_ce.requires_grad and not got_kl.requires_grad
    for g, r in zip(torch.autograd.grad(loss, list(student.parameters())), ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("impl", IMPLS)
def test_weight_zero_is_the_plain_loss(impl):
    student, teacher, ids, labels = models()
    plain = lm_loss_sum(student, ids, labels, "logits")
    plain_grads = torch.autograd.grad(plain, list(student.parameters()))
    loss, ce, kl = distill_loss_sums(student, teacher, ids, labels, 0.0, 2.0, impl)
    assert loss.item() == pytest.approx(plain.item(), rel=1e-6) and ce.item() == pytest.approx(plain.item(), rel=1e-6)
    assert kl.item() > 1.0  # still measured
    for g, r in zip(torch.autograd.grad(loss, list(student.parameters())), plain_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_fused_distillation_scales_by_the_upstream_gradient_and_skips_gradients_without_grad():
    gen = torch.Generator().manual_seed(3)
    hidden, weight = (
        torch.randn(37, 16, generator=gen, requires_grad=True),
        torch.randn(50, 16, generator=gen, requires_grad=True),
    )
    t_hidden, t_weight = torch.randn(37, 12, generator=gen), torch.randn(50, 12, generator=gen)
    targets = torch.randint(0, 50, (37,), generator=gen)
    targets[[0, 36]] = -100
    ce, kl = reference_terms(hidden @ weight.T, t_hidden @ t_weight.T, targets, 1.5)
    ref = 0.6 * ce.sum() + 0.4 * 1.5**2 * kl.sum()
    scale = 1 / 35  # the trainer's 1/tokens
    ref_grads = torch.autograd.grad(ref * scale, (hidden, weight))
    loss, got_ce, got_kl = FusedLinearDistillation.apply(hidden, weight, t_hidden, t_weight, targets, 0.4, 1.5)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for g, r in zip(torch.autograd.grad(loss * scale, (hidden, weight)), ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)
    with torch.no_grad():  # validation: the terms alone
        _, ce_only, kl_only = FusedLinearDistillation.apply(hidden, weight, t_hidden, t_weight, targets, 0.4, 1.5)
    assert ce_only.item() == pytest.approx(got_ce.item(), rel=1e-6) and kl_only.item() == pytest.approx(
        got_kl.item(), rel=1e-6
    )


@pytest.mark.parametrize("n, vocab, hidden", [(24576, 50304, 768), (16384, 50304, 2048), (7, 50304, 64), (5, 10, 64)])
def test_chunks_are_powers_of_two_within_the_memory_bound(n, vocab, hidden):
    """Logits of at most FUSED_CHUNK_MEM · n · hidden elements at a time (twice that after rounding up
    to a power of two, which lets the chunks share compiled kernels), and never more tokens than n."""
    from megatron_mlkv.training.loss import FUSED_CHUNK_MEM

    step = chunk_tokens(n, vocab, hidden)
    assert 1 <= step <= n and (step == n or step & (step - 1) == 0)
    assert step * vocab <= max(2 * FUSED_CHUNK_MEM * n * hidden, vocab)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled fused path runs on GPUs")
def test_gpu_fused_bf16_equals_the_chunked_float32_reference():
    """On a GPU: bf16 models, the fused implementation (compiled elementwise part, float32 logits from
    the bf16 GEMMs) against the chunked one on float32 copies of the same weights."""
    student, teacher, ids, labels = models()
    device = torch.device("cuda")
    ids, labels = ids.to(device), labels.to(device)
    ref_s, ref_t = student.to(device), teacher.to(device)
    want = distill_loss_sums(ref_s, ref_t, ids, labels, 0.5, 2.0, "chunked")
    want_grads = torch.autograd.grad(want[0], list(ref_s.parameters()))
    bf16_s, bf16_t = (m.to(torch.bfloat16) for m in (ref_s, ref_t))
    got = distill_loss_sums(bf16_s, bf16_t, ids, labels, 0.5, 2.0, "fused")
    for g, w in zip(got, want):
        assert g.item() == pytest.approx(w.item(), rel=3e-2)
    got_grads = torch.autograd.grad(got[0], list(bf16_s.parameters()))
    for g, w in zip(got_grads, want_grads):
        assert torch.nn.functional.cosine_similarity(g.float().flatten(), w.flatten(), dim=0) > 0.99
