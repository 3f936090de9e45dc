"""Convert a GPT-NeoX (Pythia) state dict into an MLKV layout.

GPT-NeoX fuses Q, K, V per head: the rows of `query_key_value` are `[h, 3, d_k]`. Conversion splits
them, averages the K/V heads of each query group, averages the K/V of the layers that lose theirs
into their owner, and widens every MLP so the parameter count stays at the base's.
"""
from __future__ import annotations

import torch

from .config import ConfigError, MLKVConfig
from .layout import KVLayout

MERGE_MODES = ("mean", "sequential")
MLP_INITS = ("zero", "copy")


def matched_intermediate_size(base: MLKVConfig, layout: KVLayout) -> int:
    """The MLP width that keeps the parameter count of `base` after moving to `layout`.

    The paper's rule (its Table 2): parameters lost = lost KV heads · (2·d·d_k + 2·d_k), per layer
    = lost // l, intermediate += round(per_layer / d) // 2.
    """
    d, dk = base.hidden_size, base.head_dim
    lost_heads = base.layout.kv_heads_total() - layout.kv_heads_total()
    lost = lost_heads * (2 * d * dk + 2 * dk)
    per_layer = lost // base.num_layers
    return base.intermediate_size + round(per_layer / d) // 2


def target_config(base: MLKVConfig, kv_layers: int | None = None, kv_groups: int | None = None,
                  kv_owner: list[int] | None = None, match_params: bool = True) -> MLKVConfig:
    """The converted model's config: the base's shape, the new layout, and a matched MLP width."""
    if base.layout.kv_heads_total() != base.num_layers * base.num_heads:
        raise ConfigError(f"the base must be multi-head (every layer owns {base.num_heads} KV heads); "
                          f"it has layout {base.layout.name}")
    cfg = base.with_layout(kv_layers, kv_groups, kv_owner)
    if match_params:
        cfg = base.with_layout(kv_layers, kv_groups, kv_owner,
                               intermediate_size=matched_intermediate_size(base, cfg.layout))
    return cfg


def split_qkv(tensor: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPT-NeoX `query_key_value` weight (3·h·d_k, d) or bias (3·h·d_k,) -> q, k, v of shape (h, d_k, ...)."""
    per_head = tensor.reshape(num_heads, 3, -1, *tensor.shape[1:])
    return per_head[:, 0], per_head[:, 1], per_head[:, 2]


def merge_kv(per_layer: list[torch.Tensor], num_kv_heads: int, merge: str = "mean") -> torch.Tensor:
    """Merge K (or V) heads (h, d_k, ...) of the layers an owner serves (owner first) into (g·d_k, ...).

    Heads of one query group are averaged (the GQA recipe). Layers are averaged with equal weights
    (`mean`) or folded in one at a time with a pairwise mean (`sequential`, the reference code's
    behaviour, which weights upper layers more).
    """
    if merge not in MERGE_MODES:
        raise ConfigError(f"merge = '{merge}' is not supported; allowed: {', '.join(MERGE_MODES)}")
    grouped = [t.float().reshape(num_kv_heads, -1, *t.shape[1:]).mean(dim=1) for t in per_layer]
    if merge == "mean":
        merged = torch.stack(grouped).mean(dim=0)
    else:
        merged = grouped[0]
        for t in grouped[1:]:
            merged = (merged + t) / 2
    return merged.reshape(-1, *merged.shape[2:]).to(per_layer[0].dtype)


def widen_mlp(w_in: torch.Tensor, b_in: torch.Tensor, w_out: torch.Tensor, size: int, mlp_init: str = "zero"):
    """Grow an MLP (w_in (I, d), b_in (I,), w_out (d, I)) to `size` units.

    New units copy the input weights of the first units; their output weights are zero (`zero`: the
    widened MLP computes exactly what it did) or copied too (`copy`, the reference code's choice).
    """
    if mlp_init not in MLP_INITS:
        raise ConfigError(f"mlp_init = '{mlp_init}' is not supported; allowed: {', '.join(MLP_INITS)}")
    units = w_in.shape[0]
    extra = size - units
    if extra < 0:
        raise ConfigError(f"cannot shrink the MLP from {units} to {size} units")
    if extra == 0:
        return w_in, b_in, w_out
    src = torch.arange(extra) % units
    new_out = w_out[:, src] if mlp_init == "copy" else torch.zeros_like(w_out[:, :extra])
    return torch.cat([w_in, w_in[src]]), torch.cat([b_in, b_in[src]]), torch.cat([w_out, new_out], dim=1)


def convert_layer(base_sd: dict, prefix: str, base: MLKVConfig, target: MLKVConfig, layer: int,
                  served: list[dict] | None, merge: str = "mean", mlp_init: str = "zero") -> dict:
    """One layer's tensors in MLKV names. `served`: the base tensors of the layers this owner serves
    (owner first), or None when `layer` does not own K/V."""
    h = base.num_heads
    sd = {}
    p = f"{prefix}layers.{layer}."
    out = f"layers.{layer}."
    for name in ("input_layernorm", "post_attention_layernorm"):
        for kind in ("weight", "bias"):
            sd[f"{out}{name}.{kind}"] = base_sd[f"{p}{name}.{kind}"]
    kinds = ("weight", "bias") if base.attention_bias else ("weight",)
    for kind in kinds:
        q, _, _ = split_qkv(base_sd[f"{p}attention.query_key_value.{kind}"], h)
        sd[f"{out}attention.query.{kind}"] = q.reshape(-1, *q.shape[2:])
        sd[f"{out}attention.dense.{kind}"] = base_sd[f"{p}attention.dense.{kind}"]
        if served is not None:
            ks, vs = zip(*(split_qkv(s[f"attention.query_key_value.{kind}"], h)[1:] for s in served))
            sd[f"{out}attention.key.{kind}"] = merge_kv(list(ks), target.num_kv_heads, merge)
            sd[f"{out}attention.value.{kind}"] = merge_kv(list(vs), target.num_kv_heads, merge)
    w_in, b_in, w_out = widen_mlp(base_sd[f"{p}mlp.dense_h_to_4h.weight"], base_sd[f"{p}mlp.dense_h_to_4h.bias"],
                                  base_sd[f"{p}mlp.dense_4h_to_h.weight"], target.intermediate_size, mlp_init)
    sd[f"{out}mlp.dense_h_to_4h.weight"], sd[f"{out}mlp.dense_h_to_4h.bias"] = w_in, b_in
    sd[f"{out}mlp.dense_4h_to_h.weight"] = w_out
    sd[f"{out}mlp.dense_4h_to_h.bias"] = base_sd[f"{p}mlp.dense_4h_to_h.bias"]
    return sd


def convert_state_dict(base_sd: dict, base: MLKVConfig, target: MLKVConfig, merge: str = "mean",
                       mlp_init: str = "zero", prefix: str = "gpt_neox.") -> dict:
    """A transformers `GPTNeoXForCausalLM` state dict -> an `MLKVTransformer` state dict for `target`."""
    layout = target.layout
    sd = {"embed_in.weight": base_sd[f"{prefix}embed_in.weight"],
          "final_layer_norm.weight": base_sd[f"{prefix}final_layer_norm.weight"],
          "final_layer_norm.bias": base_sd[f"{prefix}final_layer_norm.bias"]}
    head = base_sd.get("lm_head.weight", base_sd.get("embed_out.weight"))
    sd["embed_out.weight"] = sd["embed_in.weight"] if head is None or target.tie_word_embeddings else head
    for layer in range(base.num_layers):
        served = None
        if layout.owns_kv(layer):
            served = [{k.removeprefix(f"{prefix}layers.{j}."): v for k, v in base_sd.items()
                       if k.startswith(f"{prefix}layers.{j}.attention.query_key_value")}
                      for j in layout.served_layers(layer)]
        sd.update(convert_layer(base_sd, prefix, base, target, layer, served, merge, mlp_init))
    return sd
