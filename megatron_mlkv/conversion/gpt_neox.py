"""GPT-NeoX's own layout, both directions: its checkpoints' names and fused `query_key_value` (rows
`[h, 3, d_k]`) read for conversion (`GPT_NEOX`), and an MHA `MLKVTransformer` back into transformers'
`GPTNeoXForCausalLM` (same weights, same logits), the baseline the benchmarks compare against."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import ConfigError, MLKVConfig
from ..model import MLKVTransformer
from .family import Family, expect_shape


def split_qkv(tensor: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPT-NeoX `query_key_value` weight (3·h·d_k, d) or bias (3·h·d_k,) -> q, k, v of shape (h, d_k, ...)."""
    per_head = tensor.reshape(num_heads, 3, -1, *tensor.shape[1:])
    return per_head[:, 0], per_head[:, 1], per_head[:, 2]


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The inverse of `split_qkv`: q, k, v weights (h·d_k, d) or biases (h·d_k,) -> `query_key_value`."""
    fused = torch.stack([x.reshape(num_heads, -1, *x.shape[1:]) for x in (q, k, v)], dim=1)
    return fused.reshape(-1, *q.shape[1:])


def gpt_neox_config(config: MLKVConfig):
    """The transformers `GPTNeoXConfig` of an MHA `MLKVConfig`."""
    from transformers import GPTNeoXConfig

    kwargs = config.to_hf_kwargs()
    for name in ("num_kv_heads", "kv_owner", "unrotated_shared_keys"):
        kwargs.pop(name)
    return GPTNeoXConfig(**kwargs)


def to_gpt_neox(model: MLKVTransformer):
    """An MHA `MLKVTransformer` as transformers' `GPTNeoXForCausalLM` (same weights, same logits)."""
    from transformers import GPTNeoXForCausalLM

    cfg = model.config
    if cfg.layout.kv_heads_total() != cfg.num_layers * cfg.num_heads:
        raise ConfigError(f"only an MHA model maps onto GPTNeoXForCausalLM; this one is {cfg.layout.name}")
    ours = model.state_dict()
    sd = {}
    for name, t in ours.items():
        if name.startswith("embed_out"):
            sd[name] = t
            continue
        parts = name.split(".")
        if len(parts) > 3 and parts[2] == "attention" and parts[3] in ("query", "key", "value"):
            if parts[3] == "query":
                prefix, kind = ".".join(parts[:3]), parts[4]
                q, k, v = (ours[f"{prefix}.{p}.{kind}"] for p in ("query", "key", "value"))
                sd[f"gpt_neox.{prefix}.query_key_value.{kind}"] = fuse_qkv(q, k, v, cfg.num_heads)
            continue
        sd[f"gpt_neox.{name}"] = t
    param = next(model.parameters())
    with torch.device(param.device):
        ref = GPTNeoXForCausalLM(gpt_neox_config(cfg)).to(param.dtype)
    head = next(n for n, p in ref.named_parameters(remove_duplicate=False) if p is ref.get_output_embeddings().weight)
    sd[head] = sd.pop("embed_out.weight")  # `embed_out` or `lm_head`, by transformers version
    ref.load_state_dict(sd, strict=True)
    return ref.eval()


def read_layer(get: Callable[[str], torch.Tensor], base: MLKVConfig, prefix: str, i: int) -> dict:
    """Layer i of a GPT-NeoX checkpoint in our names; K and V as heads (h, d_k, ...)."""
    h, d, dk = base.num_heads, base.hidden_size, base.head_dim
    p = f"{prefix}layers.{i}."
    out = {}
    for name in ("input_layernorm", "post_attention_layernorm"):
        for kind in ("weight", "bias"):
            out[f"{name}.{kind}"] = get(f"{p}{name}.{kind}")
    for kind in ("weight", "bias") if base.attention_bias else ("weight",):
        name = f"{p}attention.query_key_value.{kind}"
        qkv = expect_shape(name, get(name), (3 * h * dk, d) if kind == "weight" else (3 * h * dk,))
        q, k, v = split_qkv(qkv, h)
        out[f"attention.query.{kind}"] = q.reshape(-1, *q.shape[2:])
        out[f"attention.key.{kind}"], out[f"attention.value.{kind}"] = k, v
        out[f"attention.dense.{kind}"] = get(f"{p}attention.dense.{kind}")
    for name in ("dense_h_to_4h", "dense_4h_to_h"):
        for kind in ("weight", "bias"):
            out[f"mlp.{name}.{kind}"] = get(f"{p}mlp.{name}.{kind}")
    return out


GPT_NEOX = Family(
    name="gpt_neox",
    prefixes=("gpt_neox.", ""),
    embed="embed_in.weight",
    final_norm="final_layer_norm",
    heads=("embed_out.weight", "lm_head.weight"),
    read_layer=read_layer,
)
