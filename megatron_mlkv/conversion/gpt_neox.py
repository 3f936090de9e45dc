"""GPT-NeoX's own layout, both directions: its fused `query_key_value` (rows `[h, 3, d_k]`) split into
q, k, v for conversion, and an MHA `MLKVTransformer` back into transformers' `GPTNeoXForCausalLM`
(same weights, same logits), the baseline the benchmarks compare against."""

from __future__ import annotations

import torch

from ..config import ConfigError, MLKVConfig
from ..model import MLKVTransformer


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
