"""The triton decode kernels (`megatron_mlkv.inference.kernels`, StaticDecoder's attention="triton") against
PyTorch, in triton's CPU interpreter.

The interpreter is chosen when triton is imported, so `test_kernels_in_the_cpu_interpreter` runs the
other tests of this file in a child pytest with TRITON_INTERPRET=1 (here they are skipped). The
interpreter's bf16 `tl.dot` is wrong, so the kernels are checked in float32 here; in bf16 on a GPU,
`benchmarks/decode_kernels.py` reports their logits against SDPA's.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import LAYOUTS, interpreted, interpreter_parent, left_padded, model_for, run_interpreted
from test_generate import greedy_uncached

from megatron_mlkv.model import apply_rotary, rotary_cos_sin


@pytest.mark.slow
@interpreter_parent
def test_kernels_in_the_cpu_interpreter():
    pytest.importorskip("triton")
    run_interpreted(__file__)  # fails unless every test of the child passed (it skips none but this one)


def reference_attention(proj, keys, values, rotary, pos, pad, h, owns_kv):
    """Per row: rotate q (and the new k), write k, v at pos, attend over [pad, pos] (float32)."""
    b, g, _, dk = keys.shape
    rot = rotary.shape[-1]
    cos, sin = rotary[0], rotary[1].clone()
    sin[:, : rot // 2] *= -1  # back to the plain sin
    keys, values, out = keys.clone(), values.clone(), []
    for i in range(b):
        c, s = cos[pos - pad[i]][None, None], sin[pos - pad[i]][None, None]
        q = apply_rotary(proj[i, : h * dk].view(h, 1, dk), c, s)[:, 0]
        if owns_kv:
            new = proj[i, h * dk :].view(2 * g, dk)
            keys[i, :, pos] = apply_rotary(new[:g, None], c, s)[:, 0]
            values[i, :, pos] = new[g:]
        k, v = keys[i, :, pad[i] : pos + 1], values[i, :, pad[i] : pos + 1]
        out.append(F.scaled_dot_product_attention(q.view(g, h // g, dk), k, v).reshape(-1))
    return torch.stack(out), keys, values


@interpreted
@pytest.mark.parametrize("owns_kv", [True, False])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("b,h,g,dk,length,rot", [(3, 4, 4, 16, 90, 4), (3, 8, 1, 32, 130, 16), (2, 6, 2, 16, 70, 16)])
def test_decode_attention_equals_reference(b, h, g, dk, length, rot, splits, owns_kv):
    """Output into a separate buffer, the MLP's GELU beside it."""
    from megatron_mlkv.inference import kernels

    torch.manual_seed(0)
    width = (h + 2 * g) * dk if owns_kv else h * dk
    hidden = torch.randn(b, width + 40)  # q [k v] | MLP hidden, as the folded layers lay it out
    keys, values = torch.randn(b, g, length, dk), torch.randn(b, g, length, dk)
    cos, sin = rotary_cos_sin(torch.arange(length)[None], rot, 10000.0, torch.float32)
    sin[..., : rot // 2] *= -1
    rotary = torch.stack([cos[0, 0], sin[0, 0]]).contiguous()
    pos, pad = length - 7, torch.tensor([0, 37, 3][:b])
    expected, expected_keys, expected_values = reference_attention(
        hidden[:, :width], keys, values, rotary, pos, pad, h, owns_kv
    )
    both = torch.full((b, h * dk + 40), float("nan"))  # attention output | activation
    counters = torch.zeros(b * g, dtype=torch.int32)
    out = kernels.decode_attention(
        hidden,
        keys,
        values,
        rotary,
        torch.tensor([pos]),
        pad,
        h,
        owns_kv,
        splits,
        out=both[:, : h * dk],
        activation=("none", hidden[:, width:], both[:, h * dk :]),
        counters=counters,
    )
    assert not counters.any()  # left ready for the next launch
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[:, h * dk :], F.gelu(hidden[:, width:]))
    torch.testing.assert_close(keys, expected_keys)  # the owner's write, and nothing else
    torch.testing.assert_close(values, expected_values)


@interpreted
@pytest.mark.parametrize("owns_kv", [True, False])
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_attention_kv_first_in_place(splits, owns_kv):
    """The folded layers' layout [k v | q | MLP hidden]: output written over q, GELU in place."""
    from megatron_mlkv.inference import kernels

    torch.manual_seed(0)
    b, h, g, dk, length, rot = 3, 8, 2, 16, 100, 16
    q_width, kv_width = h * dk, 2 * g * dk if owns_kv else 0
    proj = torch.randn(b, q_width + kv_width)  # q [k v], the reference's layout
    mlp = torch.randn(b, 40)
    hidden = torch.cat([proj[:, q_width:], proj[:, :q_width], mlp], 1)
    keys, values = torch.randn(b, g, length, dk), torch.randn(b, g, length, dk)
    cos, sin = rotary_cos_sin(torch.arange(length)[None], rot, 10000.0, torch.float32)
    sin[..., : rot // 2] *= -1
    rotary = torch.stack([cos[0, 0], sin[0, 0]]).contiguous()
    pos, pad = length - 3, torch.tensor([0, 37, 3])
    expected, expected_keys, _ = reference_attention(proj, keys, values, rotary, pos, pad, h, owns_kv)
    act = hidden[:, kv_width + q_width :]
    kernels.decode_attention(
        hidden,
        keys,
        values,
        rotary,
        torch.tensor([pos]),
        pad,
        h,
        owns_kv,
        splits,
        out=hidden[:, kv_width : kv_width + q_width],
        activation=("tanh", act, act),
        kv_first=True,
    )
    torch.testing.assert_close(hidden[:, kv_width : kv_width + q_width], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden[:, :kv_width], proj[:, q_width:])  # k, v read, not written
    torch.testing.assert_close(act, F.gelu(mlp, approximate="tanh"))
    torch.testing.assert_close(keys, expected_keys)


@interpreted
@pytest.mark.parametrize("b, k, n", [(1, 96, 40), (5, 200, 64), (70, 130, 33)])
@pytest.mark.parametrize("deep", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_equals_torch(b, k, n, deep, bias, monkeypatch):
    """Tiles that do not divide the shapes; several row tiles (70 rows); deep: the split-K partials."""
    from megatron_mlkv.inference import kernels

    monkeypatch.setattr(kernels, "LINEAR_MAX_ROWS", 128)
    monkeypatch.setattr(kernels, "LINEAR_WIDE", (64, 16, 32, 4, 2, 1))
    monkeypatch.setattr(kernels, "LINEAR_DEEP", (64, 16, 32, 4, 2, 3))
    torch.manual_seed(0)
    x, w = torch.randn(b, k + 3)[:, 3:], torch.randn(n, k)  # x's rows strided
    c = torch.randn(n) if bias else None
    y = kernels.linear(x, w, c, deep=deep)
    if deep:
        assert y.shape == (3, b, n) and y.dtype == torch.float32
        y = y.sum(0)
    torch.testing.assert_close(y, F.linear(x, w, c), atol=1e-4, rtol=1e-4)


@interpreted
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_linear_applies_gelu_from_a_column(approximate):
    from megatron_mlkv.inference import kernels

    torch.manual_seed(0)
    x, w, c = torch.randn(6, 64), torch.randn(80, 64), torch.randn(80)
    y, expected = kernels.linear(x, w, c, gelu=(approximate, 50)), F.linear(x, w, c)
    torch.testing.assert_close(y[:, :50], expected[:, :50], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y[:, 50:], F.gelu(expected[:, 50:], approximate=approximate), atol=1e-4, rtol=1e-4)


@interpreted
def test_linear_argmax_and_pick_give_the_first_largest_logit(monkeypatch):
    from megatron_mlkv.inference import kernels

    monkeypatch.setattr(kernels, "LINEAR_WIDE", (64, 16, 32, 4, 2, 1))
    torch.manual_seed(0)
    x, w = torch.randn(4, 32), torch.randn(300, 32)
    w[200] = w[17] = w[9] = w[5]  # four equal columns, two in one tile (so in every row)
    x[0] = w[5] * 10  # ... and they are row 0's largest
    logits, maxima = kernels.linear(x, w, argmax=True)
    token, history, position = torch.zeros(4, dtype=torch.long), torch.zeros(4, 9, dtype=torch.long), torch.tensor([6])
    kernels.pick(maxima, token, history, position)
    assert token[0] == 5
    assert torch.equal(token, logits.argmax(-1)) and torch.equal(history[:, 6], token)
    assert not history[:, :6].any() and not history[:, 7:].any()


@interpreted
@pytest.mark.parametrize(
    "addends, norms",
    [(a, n) for a in (0, 1, 2, "partials") for n in (1, 2, "plain")] + [(1, "rms"), ("partials", "rms2")],
)
def test_add_norm_equals_torch(addends, norms):
    from megatron_mlkv.inference import kernels
    from megatron_mlkv.model import RMSNorm

    torch.manual_seed(0)
    shapes = [(3, 5, 48), (5, 48)] if addends == "partials" else [(5, 48)] * addends
    x, parts = torch.randn(5, 48), tuple(torch.randn(s) for s in shapes)
    if str(norms).startswith("rms"):  # the Llama family's: no mean subtracted, no shift
        norms = 2 if norms == "rms2" else 1
        layer_norms = [RMSNorm(48, eps=e) for e in (1e-5, 1e-3)]
    else:
        layer_norms = [torch.nn.LayerNorm(48, eps=e) for e in (1e-5, 1e-3)]
    for ln in layer_norms:
        torch.nn.init.normal_(ln.weight)
        if getattr(ln, "bias", None) is not None:
            torch.nn.init.normal_(ln.bias)
    total, ys = kernels.add_norm(x.clone(), parts, 1e-5 if norms == "plain" else layer_norms[:norms])
    expected = x + sum(p.sum(0) if p.dim() == 3 else p for p in parts) if parts else x
    torch.testing.assert_close(total, expected)
    if norms == "plain":
        torch.testing.assert_close(ys[0], F.layer_norm(expected, (48,), eps=1e-5), atol=1e-5, rtol=1e-5)
    else:
        for y, ln in zip(ys, layer_norms[:norms], strict=True):
            torch.testing.assert_close(y, ln(expected), atol=1e-5, rtol=1e-5)


@interpreted
def test_add_norm_gathers_rows_and_advances_the_position():
    from megatron_mlkv.inference import kernels

    torch.manual_seed(0)
    table, rows, part, position = torch.randn(10, 48), torch.tensor([7, 2, 7]), torch.randn(3, 48), torch.tensor([4])
    total, (y,) = kernels.add_norm(table, (part,), 1e-5, rows=rows, advance=position)
    torch.testing.assert_close(total, table[rows] + part)
    torch.testing.assert_close(y, F.layer_norm(table[rows] + part, (48,), eps=1e-5), atol=1e-5, rtol=1e-5)
    gathered, _ = kernels.add_norm(table, (), 1e-5, rows=rows, advance=position)
    assert torch.equal(gathered, table[rows]) and position.item() == 6


def decode_logits(model, attention, splits=None, steps=4):
    from megatron_mlkv.inference.generate import StaticDecoder

    ids, mask = left_padded([[5, 6, 7, 8, 9, 10, 11], [3, 4], [9] * 20])
    decoder = StaticDecoder(model, 3, 40, attention=attention)
    decoder.splits = splits
    logits = [decoder.prefill(ids, mask)]
    for _ in range(steps):
        logits.append(decoder.step(logits[-1].argmax(-1)))
    return torch.stack(logits)


@interpreted
@pytest.mark.parametrize(
    "layout, parallel",
    [(name, True) for name in LAYOUTS]
    +
    # the sequential residual (not Pythia's): one layout with and one without
    # K/V sharing is enough, the per-layer path is the same for all
    [("gqa", False), ("mlkv-m<l", False)]
    # the Llama family (RMSNorm in `add_norm`, gated MLP, llama3 rope scaling beyond 32 positions)
    + [("llama-gqa", False), ("llama-mlkv-m<l-g<h", False)],
)
def test_triton_decoder_equals_sdpa_decoder(layout, parallel):
    family = "llama" if layout.startswith("llama-") else "gpt_neox"
    model = model_for(layout.removeprefix("llama-"), use_parallel_residual=parallel, family=family)
    expected = decode_logits(model, "sdpa")
    for splits in (None, 2):  # one split at this length, and the merged splits
        torch.testing.assert_close(decode_logits(model, "triton", splits), expected, atol=2e-5, rtol=1e-5)


@interpreted
@pytest.mark.parametrize("parallel", [True, False])
def test_triton_decoder_with_unrotated_shared_keys(parallel):
    """The paper's reference arithmetic (served layers read the owner's unrotated keys from their own
    cache slot), in the folded and the per-layer path."""
    from helpers import random_mlkv, tiny_config

    config = tiny_config(max_position_embeddings=128, use_parallel_residual=parallel, unrotated_shared_keys=True)
    model = random_mlkv(config.with_layout(**LAYOUTS["mlkv-m<l-g<h"]), std=0.3)
    expected = decode_logits(model, "sdpa")
    for splits in (None, 2):
        torch.testing.assert_close(decode_logits(model, "triton", splits), expected, atol=2e-5, rtol=1e-5)
    for layer in model.layers:  # the option ignored: shared keys rotated, another function
        layer.attention.unrotated_slot = None
    assert (decode_logits(model, "triton") - expected).abs().max() > 1e-2


@interpreted
@pytest.mark.parametrize("act", ["gelu_new", "relu"])
def test_triton_decoder_other_activations(act):
    model = model_for("mlkv-m<l-g<h", hidden_act=act)
    torch.testing.assert_close(decode_logits(model, "triton", 2), decode_logits(model, "sdpa"), atol=2e-5, rtol=1e-5)


@interpreted
def test_generate_uses_the_kernels_and_equals_uncached_greedy():
    from megatron_mlkv.inference.generate import StaticDecoder, default_attention, generate

    model = model_for("mlkv-m<l-g<h")
    assert default_attention(model.config, torch.device("cpu")) == "triton"
    assert StaticDecoder(model, 1, 8).fused
    assert not StaticDecoder(model_for("mqa").to(torch.bfloat16), 1, 8).fused  # the interpreter's bf16 dot is wrong
    ids, mask = left_padded([[5, 6, 7, 8, 9], [3, 4], [9] * 8])
    out = generate(model, ids, 6, attention_mask=mask)
    torch.testing.assert_close(out, greedy_uncached(model, ids, mask, 6))
