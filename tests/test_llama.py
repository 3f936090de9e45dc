"""The Llama family (Llama, Qwen2, Mistral) against transformers' own classes: identity conversion of
tiny random checkpoints transformers saved, MLKV layouts whose cache holds m·g heads and whose cached
generation equals uncached, the plain folder of the base's class, parameter matching at real shapes,
and the refusals. Training, TP and the decode kernels: test_uptrain.py, test_tensor_parallel.py,
test_kernels.py."""

import json

import pytest
import torch
from helpers import LLAMA_KINDS, llama_family, tiny_config

from megatron_mlkv.config import ConfigError, MLKVConfig
from megatron_mlkv.conversion import convert_checkpoint, convert_paper_variants, paper_variants, target_config
from megatron_mlkv.errors import CheckpointError
from megatron_mlkv.hf import output_cache
from megatron_mlkv.inference.generate import generate
from megatron_mlkv.loading import load_pretrained

pytestmark = pytest.mark.compat  # transformers' Llama, Qwen2 and Mistral classes and their generate


@pytest.fixture(scope="module", params=list(LLAMA_KINDS))
def base(request, tmp_path_factory, tokenizer_dir):
    """(kind, the transformers model, its saved folder with a tokenizer)."""
    from transformers import AutoTokenizer

    model = llama_family(request.param, vocab_size=300)
    folder = tmp_path_factory.mktemp(request.param) / "base"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return request.param, model, folder


def ids(n=3, s=40, vocab=300, seed=1):
    return torch.randint(0, vocab, (n, s), generator=torch.Generator().manual_seed(seed))


def test_identity_conversion_gives_transformers_logits_and_a_plain_folder(base, tmp_path):
    """m = l, g = g_b: the base itself, through our remote code, our loader and the plain folder of
    the base's own class (no remote code)."""
    from transformers import AutoModelForCausalLM

    kind, ref, folder = base
    report = convert_checkpoint(str(folder), tmp_path / "out", progress=False)
    assert report["layout"] == "GQA-16" and report["parameters"]["after"] == report["parameters"]["before"]
    x = ids()
    with torch.no_grad():
        want = ref(x).logits
        ours = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
        assert ours.config.model_type == "mlkv_llama" and ours.config.base_model_type == kind
        torch.testing.assert_close(ours(x).logits, want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(load_pretrained(tmp_path / "out").eval()(x), want, atol=1e-4, rtol=1e-4)
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "plain").eval()
        assert type(plain) is type(ref) and report["plain"].startswith("plain/")
        torch.testing.assert_close(plain(x).logits, want, atol=1e-4, rtol=1e-4)
    assert (tmp_path / "out" / "plain" / "tokenizer.json").is_file()
    assert "auto_map" not in json.loads((tmp_path / "out" / "plain" / "config.json").read_text())


@pytest.mark.parametrize("m, g", [(2, 2), (1, 1), (4, 1)])
def test_mlkv_layouts_cache_m_g_heads_and_cached_generation_equals_uncached(base, tmp_path, m, g):
    """The converted model's cache holds exactly m·g heads a token; transformers' generate (its
    DynamicCache, through our remote code) and ours equal greedy decoding without a cache."""
    from transformers import AutoModelForCausalLM

    kind, _, folder = base
    report = convert_checkpoint(str(folder), tmp_path / "out", m, g, progress=False)
    assert (
        report["kv_heads"]["after"] == m * g
        and abs(report["parameters"]["after"] / report["parameters"]["before"] - 1) < 0.01
    )
    assert ("plain" in report) == (m == 4)  # the base's class holds a layout without cross-layer sharing
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    prompt = ids(2, 12)
    out = hf.generate(prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    filled = [layer for layer in output_cache(out).layers if isinstance(layer.keys, torch.Tensor)]
    assert len(filled) == m and all(layer.keys.shape[1] == layer.values.shape[1] == g for layer in filled)
    uncached = prompt
    with torch.no_grad():
        for _ in range(6):
            nxt = hf(uncached, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            uncached = torch.cat([uncached, nxt], 1)
    assert torch.equal(out.sequences, uncached)
    model = load_pretrained(tmp_path / "out").eval()
    assert torch.equal(generate(model, prompt, 6, attention="sdpa"), uncached)


@pytest.mark.parametrize(
    "shape, within",
    [
        # Llama-3.2-1B: 16 layers, hidden 2048, 32 heads over 8 KV heads, MLP 8192, vocabulary 128256, tied
        (
            dict(
                num_layers=16, hidden_size=2048, num_heads=32, num_kv_heads=8, intermediate_size=8192, vocab_size=128256
            ),
            1e-4,
        ),
        # SmolLM-135M: 30 layers, hidden 576, 9 heads over 3 KV heads, MLP 1536, vocabulary 49152, tied. One MLP
        # unit in all its layers is 3 x 576 x 30 parameters, 3.9e-4 of them: the nearest width is within half that
        (
            dict(num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, intermediate_size=1536, vocab_size=49152),
            2e-4,
        ),
    ],
)
def test_the_widened_gated_mlp_keeps_the_parameter_count_at_real_shapes(shape, within):
    base = tiny_config(family="llama", tie_word_embeddings=True, max_position_embeddings=2048, **shape)
    unit = 3 * base.hidden_size * base.num_layers / base.num_parameters()
    for name, m, g in paper_variants(base.num_layers, base.num_heads, base.num_kv_heads):
        target = target_config(base, m, g)
        assert target.layout.name.lower() == name and target.intermediate_size > base.intermediate_size
        error = abs(target.num_parameters() / base.num_parameters() - 1)
        assert error < within and error <= unit / 2, name


def test_the_widened_gated_mlp_computes_what_it_did():
    """--mlp-init zero: the added units' gate and up rows copy existing ones, their down columns are 0."""
    from megatron_mlkv.conversion import widen_mlp
    from megatron_mlkv.model import GatedMLP

    mlp = GatedMLP(tiny_config(family="llama", mlp_bias=True))
    for p in mlp.parameters():
        torch.nn.init.normal_(p)
    inputs = {f"{n}.{k}": getattr(getattr(mlp, n), k) for n in ("gate_proj", "up_proj") for k in ("weight", "bias")}
    widened, down = widen_mlp(inputs, mlp.down_proj.weight, 130)
    wide = GatedMLP(tiny_config(family="llama", mlp_bias=True, intermediate_size=130))
    wide.load_state_dict({**widened, "down_proj.weight": down, "down_proj.bias": mlp.down_proj.bias})
    x = torch.randn(5, 64)
    torch.testing.assert_close(wide(x), mlp(x))
    assert widened["gate_proj.weight"].shape == (130, 64) and down.shape == (64, 130)


def test_paper_variants_of_a_gqa_base_halve_its_cache(base, tmp_path):
    kind, _, folder = base
    reports = convert_paper_variants(str(folder), tmp_path, progress=False)
    assert [r["layout"] for r in reports] == ["GQA-8", "MLKV-8", "MQA-4", "MLKV-4", "MLKV-2", "MLKV-1"]
    assert [r["kv_heads"]["after"] for r in reports] == [8, 8, 4, 4, 2, 1]


def test_a_checkpoint_the_model_does_not_implement_is_refused_in_one_line(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(
        CheckpointError, match=r"model_type 'gpt2' \(GPT2LMHeadModel\) is not supported; supported: .*qwen2"
    ):
        convert_checkpoint(str(tmp_path / "gpt2"), tmp_path / "out", progress=False)
    cases = {
        "window": (llama_family("mistral", sliding_window=16), r"sliding_window = 16 < max_position_embeddings = 128"),
        "yarn": (
            llama_family("llama", rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0)),
            r"rope scaling 'yarn' is not implemented; implemented: default, linear, llama3",
        ),
    }
    for name, (model, message) in cases.items():
        model.save_pretrained(tmp_path / name)
        with pytest.raises(ConfigError, match=message):
            convert_checkpoint(str(tmp_path / name), tmp_path / f"{name}-out", progress=False)
    model = llama_family("llama", num_key_value_heads=2)
    model.save_pretrained(tmp_path / "g2")
    with pytest.raises(ConfigError, match=r"kv_groups \(g\) = 4 must divide the base's 2 KV heads.*allowed: 1, 2$"):
        convert_checkpoint(str(tmp_path / "g2"), tmp_path / "g2-out", 4, 4, progress=False)
    assert not any(p.name.endswith("-out") for p in tmp_path.iterdir())  # nothing written


def test_linear_rope_scaling_and_a_stated_head_dim_follow_transformers(tmp_path):
    from megatron_mlkv.conversion import convert_state_dict
    from megatron_mlkv.model import MLKVTransformer

    ref = llama_family(
        "llama",
        head_dim=16,
        attention_bias=True,
        mlp_bias=True,
        rope_parameters=dict(rope_type="linear", rope_theta=1e4, factor=2.0),
    )
    cfg = MLKVConfig.from_hf(ref.config)
    assert cfg.head_dim == 16 != cfg.hidden_size // cfg.num_heads and cfg.rope_scaling["rope_type"] == "linear"
    model = MLKVTransformer(cfg).eval()
    model.load_state_dict(convert_state_dict(ref.state_dict(), cfg, cfg))
    x = ids(2, 50, vocab=101)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, atol=1e-4, rtol=1e-4)
        cfg_plain = MLKVConfig.from_hf(ref.config, rope_scaling=None)
        plain = MLKVTransformer(cfg_plain).eval()
        plain.load_state_dict(model.state_dict())
        assert (plain(x) - ref(x).logits).abs().max() > 1e-3  # the scaling matters at these positions


def test_the_norms_of_the_family_take_no_weight_decay():
    """RMSNorm's scale is a norm's to the optimizer (no decay), in plain and in packed layers."""
    from megatron_mlkv.model import MLKVTransformer
    from megatron_mlkv.training.optim import param_groups
    from megatron_mlkv.training.packing import pack_layers

    model = MLKVTransformer(tiny_config(family="llama", mlp_bias=True, kv_layers=2, num_kv_heads=2))
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in param_groups(model, 0.01))
    norms = {n for n in names.values() if "layernorm" in n or n.startswith("final_layer_norm")}
    assert len(norms) == 2 * 4 + 1 and norms <= no_decay and "layers.0.mlp.gate_proj.weight" in decay
    pack_layers(model)
    packed_no_decay = [key for key, *_ in model.layers[0]._packed["packed_no_decay"]]
    assert {"input_layernorm.weight", "post_attention_layernorm.weight"} <= set(packed_no_decay)
    assert "mlp.gate_proj.weight" in [key for key, *_ in model.layers[0]._packed["packed_decay"]]
