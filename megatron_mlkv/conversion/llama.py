"""The Llama family's layout (Llama, Qwen2, Mistral, SmolLM), both directions: their checkpoints' names
read for conversion (`LLAMA`), and a model without cross-layer sharing written back as the base's own
transformers class (`to_base_model`), a folder any tool that reads Llama checkpoints serves."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import ConfigError, MLKVConfig
from ..model import MLKVTransformer
from .family import Family, expect_shape

# our names -> the family's, inside a layer
LAYER_NAMES = {
    "input_layernorm": "input_layernorm",
    "post_attention_layernorm": "post_attention_layernorm",
    "attention.query": "self_attn.q_proj",
    "attention.key": "self_attn.k_proj",
    "attention.value": "self_attn.v_proj",
    "attention.dense": "self_attn.o_proj",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj",
}
# the base classes a plain folder is written as, by model type
CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


def _has_bias(config: MLKVConfig, ours: str) -> bool:
    if ours.startswith("attention."):
        return config.attention_out_bias if ours == "attention.dense" else config.attention_bias
    return ours.startswith("mlp.") and config.mlp_bias


def read_layer(get: Callable[[str], torch.Tensor], base: MLKVConfig, prefix: str, i: int) -> dict:
    """Layer i of a Llama-family checkpoint in our names; K and V as heads (g_b, d_k, ...)."""
    d, dk, g = base.hidden_size, base.head_dim, base.num_kv_heads
    out = {}
    for ours, theirs in LAYER_NAMES.items():
        kinds = ("weight", "bias") if _has_bias(base, ours) else ("weight",)
        for kind in kinds:
            name = f"{prefix}layers.{i}.{theirs}.{kind}"
            t = get(name)
            if ours in ("attention.key", "attention.value"):
                t = expect_shape(name, t, (g * dk, d) if kind == "weight" else (g * dk,)).reshape(g, dk, *t.shape[1:])
            out[f"{ours}.{kind}"] = t
    return out


LLAMA = Family(
    name="llama",
    prefixes=("model.", ""),
    embed="embed_tokens.weight",
    final_norm="norm",
    heads=("lm_head.weight",),
    read_layer=read_layer,
)


def base_config(config: MLKVConfig):
    """The transformers config of the base's own class (`config.base_model_type`) for a model without
    cross-layer sharing."""
    from transformers import AutoConfig

    kwargs = config.to_hf_kwargs()
    for name in ("kv_owner", "attention_out_bias", "base_model_type"):
        kwargs.pop(name)
    kind = config.base_model_type
    if kind == "qwen2":  # biased q, k, v and an unbiased output are Qwen2's only form
        kwargs.pop("attention_bias"), kwargs.pop("mlp_bias")
    elif kind == "mistral":
        kwargs.pop("attention_bias"), kwargs.pop("mlp_bias")
        kwargs["sliding_window"] = None
    return AutoConfig.for_model(kind, **kwargs)


def check_base_form(config: MLKVConfig) -> None:
    """Refuse, in one line, a model the base's own class cannot hold: one that shares K/V across
    layers, or whose biases that class cannot express."""
    if config.layout.kv_layers != config.num_layers:
        raise ConfigError(
            f"{config.layout.name} shares K/V across layers (m = {config.layout.kv_layers} < l = "
            f"{config.num_layers}): only the remote-code folder holds it"
        )
    kind = config.base_model_type
    forms = {
        "llama": config.attention_bias == config.attention_out_bias,
        "qwen2": config.attention_bias and not config.attention_out_bias and not config.mlp_bias,
        "mistral": not (config.attention_bias or config.attention_out_bias or config.mlp_bias),
    }
    if kind not in forms or not forms[kind]:
        raise ConfigError(f"a {kind} model has no class in transformers with these biases")


def base_state_dict(sd: dict) -> dict:
    """Our state dict (names of `MLKVTransformer`) under the family's names (`LlamaForCausalLM`'s)."""
    out = {}
    for name, t in sd.items():
        if name == "embed_in.weight":
            out["model.embed_tokens.weight"] = t
        elif name == "embed_out.weight":
            out["lm_head.weight"] = t
        elif name.startswith("final_layer_norm."):
            out[f"model.norm.{name.rpartition('.')[2]}"] = t
        else:
            _, i, rest = name.split(".", 2)
            module, _, kind = rest.rpartition(".")
            out[f"model.layers.{i}.{LAYER_NAMES[module]}.{kind}"] = t
    return out


def base_model(
    sd: dict, config: MLKVConfig, dtype: torch.dtype | None = None, hf_kwargs: dict | None = None, device="meta"
):
    """The base's own transformers class (LlamaForCausalLM, Qwen2ForCausalLM or MistralForCausalLM) holding
    our state dict `sd` of `config` (no cross-layer sharing: `check_base_form`); its weights are `sd`'s
    tensors (cast to `dtype`), not copies. Built on `device`: on "meta" (the default, to save it: nothing
    is allocated twice) its non-persistent buffers (the rotary frequencies) are left unset, so run only
    a model built on a real device."""
    from transformers import AutoModelForCausalLM

    check_base_form(config)
    hf_config = base_config(config)
    for key, value in (hf_kwargs or {}).items():
        setattr(hf_config, key, value)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config)
    if dtype is not None:
        model.to(dtype)
    state = {
        k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in base_state_dict(sd).items()
    }
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) - ({"lm_head.weight"} if config.tie_word_embeddings else set()):
        raise RuntimeError(f"{type(model).__name__}: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    if dtype is not None:
        model.config.dtype = dtype
    return model.eval()


def to_base_model(model: MLKVTransformer):
    """A Llama-family `MLKVTransformer` without cross-layer sharing as the base's transformers class
    (same weights, same logits)."""
    param = next(model.parameters())
    return base_model(model.state_dict(), model.config, param.dtype, device=param.device)
