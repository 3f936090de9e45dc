import pytest
import torch
from helpers import LAYOUTS, left_padded, model_for
from transformers import AutoModelForCausalLM

from megatron_mlkv.hf import export_pretrained
from megatron_mlkv.inference.generate import StaticDecoder, StaticKVCache, generate, pad_mlp_

pytestmark = pytest.mark.compat  # transformers' generation and cache classes: also `make test-compat`


def greedy_uncached(model, ids, mask, steps):
    """Greedy decoding by re-running the whole sequence each step: argmax of the full forward."""
    for _ in range(steps):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, position_ids=pos)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype,size", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_cache_bytes_are_exactly_the_owner_heads(layout, dtype, size):
    cfg = model_for(layout).config
    m, g, dk = cfg.layout.kv_layers, cfg.num_kv_heads, cfg.head_dim
    cache = StaticKVCache.allocate(cfg, batch_size=3, max_len=50, dtype=dtype)
    assert cache.keys.shape == (m, 3, g, 50, dk)
    assert cache.nbytes == 2 * 3 * 50 * m * g * dk * size
    assert cache.nbytes == cfg.layout.cache_elements(3, 50, dk) * size


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fast_generate_equals_uncached_greedy(layout):
    model = model_for(layout)
    ids = torch.randint(0, 101, (3, 11))
    out = generate(model, ids, 12, prefill_chunk_tokens=22)  # two rows per prefill chunk
    assert torch.equal(out, greedy_uncached(model, ids, torch.ones_like(ids), 12))


@pytest.mark.parametrize("layout", ["mha", "mlkv-m<l-g<h", "non-uniform"])
def test_fast_generate_with_left_padding(layout):
    model = model_for(layout, seed=1)
    prompts = [[5, 17, 33, 2, 8, 90, 12, 4], [44, 3, 9], [7, 7, 61, 20, 5]]
    ids, mask = left_padded(prompts)
    out = generate(model, ids, 10, attention_mask=mask)
    assert torch.equal(out, greedy_uncached(model, ids, mask, 10))
    for row, prompt in enumerate(prompts):  # padding changes nothing: each prompt alone decodes the same
        alone = generate(model, torch.tensor([prompt]), 10)
        assert alone[0, len(prompt) :].tolist() == out[row, ids.shape[1] :].tolist()


@pytest.mark.parametrize(
    "changes",
    [
        dict(use_parallel_residual=False),
        dict(rotary_pct=1.0),
        dict(tie_word_embeddings=True),
        dict(attention_bias=False),
    ],
    ids=["sequential-residual", "full-rotary", "tied", "no-bias"],
)
def test_fast_generate_honours_model_options(changes):
    model = model_for("mlkv-m<l-g<h", **changes)
    ids = torch.randint(0, 101, (2, 9))
    assert torch.equal(generate(model, ids, 8), greedy_uncached(model, ids, torch.ones_like(ids), 8))


def test_matmul_attention_equals_sdpa_attention():
    model = model_for("mlkv-m<l-g<h")
    ids = torch.randint(0, 101, (2, 9))
    logits = {}
    for attention in ("sdpa", "matmul"):
        decoder = StaticDecoder(model, 2, 12, attention=attention)
        token = decoder.prefill(ids).argmax(-1)
        logits[attention] = torch.stack([decoder.step(token) for _ in range(3)])
    assert torch.allclose(logits["sdpa"], logits["matmul"], atol=1e-5)


def test_equals_the_transformers_wrapper_generate(tmp_path):
    model = model_for("mlkv-m<l-g<h", seed=2)
    path = export_pretrained(model.state_dict(), model.config, tmp_path / "mlkv")
    hf = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    ids, mask = left_padded([[5, 17, 33, 2, 8, 90, 12], [44, 3, 9], [7, 7, 61, 20, 5]])
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=1)
    assert torch.equal(generate(hf.model, ids, 10, attention_mask=mask), expected)


def test_static_cache_serves_the_model_forward_like_dynamic_cache():
    model = model_for("mlkv-m<l-g<h")
    ids = torch.randint(0, 101, (2, 20))
    cache = StaticKVCache.allocate(model.config, 2, 24)
    with torch.no_grad():
        full = model(ids)
        steps = [model(ids[:, :12], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(12, 20)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    assert cache.get_seq_length() == 20 and not cache.keys[:, :, :, 20:].any()


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = model_for("mlkv-1")
    ids = torch.randint(0, 101, (2, 6))

    def sample(seed, **kw):
        return generate(model, ids, 8, do_sample=True, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(sample(3, temperature=0.7), sample(3, temperature=0.7))
    assert torch.equal(sample(4, top_k=1), generate(model, ids, 8))


def test_rows_after_eos_keep_emitting_it():
    model = model_for("mqa")
    ids = torch.randint(0, 101, (2, 6))
    greedy = generate(model, ids, 8)
    eos = int(greedy[0, 8])  # the third generated token of row 0
    out = generate(model, ids, 8, eos_token_id=eos)
    for row in range(2):
        new = out[row, 6:].tolist()
        if eos in new:
            first = new.index(eos)
            assert new[:first] == greedy[row, 6 : 6 + first].tolist() and set(new[first:]) == {eos}
    assert out[0, 8:].tolist() == [eos] * 6


def test_greedy_steps_equal_stepping_with_argmax_and_continue():
    model = model_for("mlkv-m<l-g<h")
    ids = torch.randint(0, 101, (2, 9))
    stepped, greedy = StaticDecoder(model, 2, 16), StaticDecoder(model, 2, 16)
    tokens = [stepped.prefill(ids).argmax(-1)]
    greedy.prefill(ids)
    for _ in range(5):
        tokens.append(stepped.step(tokens[-1]).argmax(-1))
    first = greedy.greedy(tokens[0], 2)
    assert torch.equal(torch.cat([first, greedy.greedy(first[:, -1], 3)[:, 1:]], 1), torch.stack(tokens, 1))


def test_clear_errors_for_overflow():
    model = model_for("mha")
    decoder = StaticDecoder(model, 2, 8)
    with pytest.raises(ValueError, match="at most 7 prompt tokens"):
        decoder.prefill(torch.zeros(2, 8, dtype=torch.long))
    token = decoder.prefill(torch.zeros(2, 7, dtype=torch.long)).argmax(-1)
    decoder.step(token)
    with pytest.raises(ValueError, match="the cache is full"):
        decoder.step(token)
    decoder.prefill(torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="3 steps after 6 tokens overflow the cache of 8 tokens"):
        decoder.greedy(token, 3)
    with pytest.raises(ValueError, match="max_new_tokens = 0"):
        generate(model, torch.zeros(1, 3, dtype=torch.long), 0)


def test_pad_mlp_keeps_the_function_and_aligns_the_width():
    model = model_for("mlkv-m<l-g<h", intermediate_size=90)
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        before = model(ids)
    expected = generate(model, ids, 6)
    pad_mlp_(model)
    assert {block.mlp.dense_h_to_4h.weight.shape[0] for block in model.layers} == {128}
    assert {block.mlp.dense_4h_to_h.weight.shape[1] for block in model.layers} == {128}
    with torch.no_grad():
        assert torch.allclose(model(ids), before, atol=1e-6)
    assert torch.equal(generate(model, ids, 6), expected)
