import math

import pytest
import torch
from helpers import gpt_neox, mlkv_from_gpt_neox, random_mlkv, tiny_config
from transformers import DynamicCache

from megatron_mlkv.config import ConfigError, MLKVConfig, preset
from megatron_mlkv.model import MLKVTransformer

pytestmark = pytest.mark.compat  # transformers' GPT-NeoX as the oracle: also run by `make test-compat`


@pytest.mark.parametrize("rotary_pct", [0.25, 1.0])
@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("bias,tie", [(True, False), (False, True)])
def test_mha_equals_transformers_gpt_neox(rotary_pct, parallel, bias, tie):
    ref = gpt_neox(
        rotary_pct=rotary_pct,
        use_parallel_residual=parallel,
        attention_bias=bias,
        tie_word_embeddings=tie,
        rotary_emb_base=500.0,
        layer_norm_eps=1e-3,
    )
    model = mlkv_from_gpt_neox(ref)
    assert model.config.rotary_pct == rotary_pct and model.config.rotary_emb_base == 500.0
    ids = torch.randint(0, 101, (3, 40))
    with torch.no_grad():
        diff = (ref(ids).logits - model(ids)).abs().max().item()
    assert diff < 1e-4


def naive_forward(model: MLKVTransformer, ids: torch.Tensor) -> torch.Tensor:
    """An independent reading of the MLKV equations: explicit softmax attention, heads repeated by
    hand, K/V of each owner kept and reused by the layers it serves."""
    cfg = model.config
    b, s = ids.shape
    dk, h, g, rot = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.rotary_dim
    pos = torch.arange(s, dtype=torch.float64)
    inv = 1.0 / cfg.rotary_emb_base ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    ang = torch.cat([pos[:, None] * inv, pos[:, None] * inv], dim=-1)

    def rope(x):  # (b, heads, s, dk)
        r, p = x[..., :rot].double(), x[..., rot:]
        half = torch.cat([-r[..., rot // 2 :], r[..., : rot // 2]], dim=-1)
        return torch.cat([(r * ang.cos() + half * ang.sin()).float(), p], dim=-1)

    x = model.embed_in.weight[ids]
    owner_kv = {}
    causal = torch.ones(s, s).tril().bool()
    for i, block in enumerate(model.layers):
        att = block.attention
        hin = torch.nn.functional.layer_norm(
            x, (cfg.hidden_size,), block.input_layernorm.weight, block.input_layernorm.bias, cfg.layer_norm_eps
        )
        q = rope(att.query(hin).view(b, s, h, dk).transpose(1, 2))
        if cfg.kv_owner[i] == i:
            assert hasattr(att, "key") and hasattr(att, "value")
            k = rope(att.key(hin).view(b, s, g, dk).transpose(1, 2))
            v = att.value(hin).view(b, s, g, dk).transpose(1, 2)
            owner_kv[i] = (k, v)
        else:
            assert not hasattr(att, "key") and not hasattr(att, "value")
            k, v = owner_kv[cfg.kv_owner[i]]
        group = [j * g // h for j in range(h)]  # query head j -> KV head floor(j / (h/g))
        k, v = k[:, group], v[:, group]
        scores = q @ k.transpose(-1, -2) / math.sqrt(dk)
        attn = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        attn = block.attention.dense(attn.transpose(1, 2).reshape(b, s, -1))
        ln2 = lambda t, block=block: torch.nn.functional.layer_norm(
            t,
            (cfg.hidden_size,),
            block.post_attention_layernorm.weight,
            block.post_attention_layernorm.bias,
            cfg.layer_norm_eps,
        )
        if cfg.use_parallel_residual:
            x = x + attn + block.mlp(ln2(x))
        else:
            x = x + attn
            x = x + block.mlp(ln2(x))
    x = model.final_layer_norm(x)
    return model.embed_out(x)


@pytest.mark.parametrize(
    "m,g,owner", [(2, 2, None), (1, 1, None), (4, 1, None), (3, 4, None), (None, 2, (0, 0, 2, 0, 4, 2))]
)
def test_mlkv_equals_naive_reference(m, g, owner):
    cfg = tiny_config(num_layers=6, use_parallel_residual=owner is None).with_layout(m, g, owner)
    model = random_mlkv(cfg, std=0.15)
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        diff = (model(ids) - naive_forward(model, ids)).abs().max().item()
    assert diff < 1e-4


def test_non_owner_layers_have_no_kv_parameters():
    cfg = tiny_config(num_layers=6).with_layout(2, 1)
    model = MLKVTransformer(cfg)
    owners = [i for i, b in enumerate(model.layers) if hasattr(b.attention, "key")]
    assert owners == [0, 3]
    assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters()
    assert all(
        not any("key" in n or "value" in n for n, _ in model.layers[i].named_parameters())
        for i in range(6)
        if i not in owners
    )


@pytest.mark.parametrize(
    "cfg",
    [
        tiny_config(),
        tiny_config().with_layout(2, 2),
        tiny_config(tie_word_embeddings=True, attention_bias=False).with_layout(1, 1),
        preset("pythia-70m").with_layout(3, 2),
    ],
)
def test_parameter_count_matches_instantiated_model(cfg):
    with torch.device("meta"):
        model = MLKVTransformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters()


def test_pythia_160m_preset_has_the_papers_count():
    assert preset("EleutherAI/pythia-160m-deduped").num_parameters() == 162_322_944


def test_flops_per_token_for_mha_matches_the_standard_formula():
    cfg = preset("pythia-160m")
    l, d, v, s = cfg.num_layers, cfg.hidden_size, cfg.vocab_size, 2048
    assert cfg.flops_per_token(s) == 6 * (12 * l * d * d + d * v) + 12 * l * d * s
    assert cfg.with_layout(6, 1).flops_per_token(s) < cfg.flops_per_token(s)


def test_activation_checkpointing_gives_the_same_gradients():
    cfg = tiny_config(num_layers=6).with_layout(2, 2)
    model = random_mlkv(cfg, std=0.1).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 16))

    def grads():
        model.zero_grad()
        model(ids).logsumexp(-1).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.gradient_checkpointing = True
    ckpt = grads()
    assert plain.keys() == ckpt.keys()
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], atol=1e-6), name
    # owner K/V receive gradient from the layers they serve
    assert plain["layers.0.attention.key.weight"].abs().sum() > 0


def test_incremental_decoding_with_cache_equals_full_forward():
    cfg = tiny_config(num_layers=6).with_layout(3, 2)
    model = random_mlkv(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    cache = DynamicCache()
    with torch.no_grad():
        full = model(ids)
        steps = [model(ids[:, :12], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(12, 20)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    cached = [t for layer in cache.layers for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor)]
    assert sum(t.numel() for t in cached) == cfg.layout.cache_elements(2, 20, cfg.head_dim)


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("hidden_size", 66, "hidden_size = 66 must be divisible by num_heads = 4"),
        ("num_layers", 0, "num_layers = 0"),
        ("rotary_pct", 1.5, "rotary_pct = 1.5"),
        ("hidden_act", "swish2", "hidden_act = 'swish2'"),
        ("num_kv_heads", 3, "kv_groups (g) = 3 must divide num_heads (h) = 4"),
    ],
)
def test_config_errors_name_the_field(field, value, needle):
    with pytest.raises(ConfigError) as err:
        tiny_config(**{field: value})
    assert needle in str(err.value)


def test_with_layout_errors():
    with pytest.raises(ConfigError, match=r"kv_layers \(m\) = 5"):
        tiny_config().with_layout(5, 1)
    with pytest.raises(ConfigError, match="kv_owner\\[2\\] = 1"):
        tiny_config().with_layout(kv_owner=[0, 0, 1, 3])
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("pythia-7b")


def test_from_hf_round_trip():
    ref = gpt_neox(rotary_pct=0.5, use_parallel_residual=False, rotary_emb_base=1234.0)
    cfg = MLKVConfig.from_hf(ref.config)
    assert (cfg.rotary_pct, cfg.rotary_emb_base, cfg.use_parallel_residual) == (0.5, 1234.0, False)
    from megatron_mlkv.configuration_mlkv import MLKVGPTNeoXConfig

    assert MLKVGPTNeoXConfig.from_model_config(cfg.with_layout(1, 2)).model_config() == cfg.with_layout(1, 2)
