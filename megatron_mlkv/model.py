"""GPT-NeoX and Llama with Multi-Layer Key-Value sharing, in plain PyTorch.

Owner layers project `g` key/value heads; every other layer has no key/value projection at all and
attends with the (rotated) keys and values of its owner, so K/V compute, activations and cache exist
only in the m owner layers. With m = l and g = h this is exactly GPT-NeoX (or Llama with multi-head
attention; with m = l and the base's g, the base Llama/Qwen2/Mistral). `unrotated_shared_keys`
(the paper's reference code) hands the served layers the owner's keys before rotation instead.

A family (`MLKVConfig.family`) is its norm, its MLP and its residual, chosen in `Block`: GPT-NeoX
LayerNorm + `MLP` (parallel or sequential residual), Llama `RMSNorm` + `GatedMLP` (sequential).
Attention, rotary and the sharing of K/V are the same for both.

The model knows nothing of parallelism: reshapes use -1 for the head count, so a tensor-parallel plan
that shards the projections simply gives each rank fewer local heads.

This file is copied next to exported checkpoints (transformers remote code): torch, the standard
library and relative imports only.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import MLKVConfig

ACT_FN = {
    "gelu": F.gelu,
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),
    "gelu_fast": functools.partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def rotary_inv_freq(rotary_dim: int, base: float, scaling: dict | None = None, device=None) -> torch.Tensor:
    """The rotary frequencies (rotary_dim/2,), float32, with `scaling` applied (`config.ROPE_TYPES`):
    `linear` divides them by `factor`; `llama3` divides the low frequencies (wavelengths beyond
    original_max_position_embeddings / low_freq_factor) by `factor`, keeps the high ones (below
    ... / high_freq_factor) and interpolates smoothly between."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim))
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor, old = scaling["factor"], scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old / wavelen - low) / (high - low)).clamp(0.0, 1.0)  # 0: long wavelengths, 1: short
        return (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return inv_freq


def rotary_cos_sin(
    position_ids: torch.Tensor, rotary_dim: int, base: float, dtype: torch.dtype, scaling: dict | None = None
):
    """cos, sin of shape (b, 1, s, rotary_dim) for position_ids (b, s); computed in float32.

    Recomputed per call rather than kept as a buffer, so casting the model to bf16 cannot round the
    frequencies.
    """
    inv_freq = rotary_inv_freq(rotary_dim, base, scaling, position_ids.device)
    freqs = position_ids[..., None].float() * inv_freq  # (b, s, rotary_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.size(-1) dims of x (b, heads, s, d_k); the rest pass through."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x1, x2 = x_rot[..., : rot // 2], x_rot[..., rot // 2 :]
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


def attention_mask_for(attention_mask: torch.Tensor | None, q_len: int, kv_len: int, device):
    """The SDPA mask for q_len new queries at the end of kv_len positions: (mask or None, is_causal).

    attention_mask (b, kv_len) marks real tokens with 1 (left padding with 0). Queries that see no
    real key (padding positions) attend to themselves so softmax stays finite; their outputs are
    never used.
    """
    if attention_mask is None or bool(attention_mask[:, :kv_len].all()):
        if q_len == kv_len:
            return None, True
        if q_len == 1:
            return None, False
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None, None]  # (1, 1, q, kv)
    if attention_mask is not None:
        allowed = (allowed & attention_mask[:, None, None, :kv_len].bool()) | (k_pos == q_pos)
    return allowed, False


class Attention(nn.Module):
    """Causal self-attention whose K/V are either projected here (owner) or handed in (shared)."""

    def __init__(self, config: MLKVConfig, layer: int):
        super().__init__()
        layout, d, dk, bias = config.layout, config.hidden_size, config.head_dim, config.attention_bias
        self.head_dim = dk
        self.owns_kv = layout.owns_kv(layer)
        self.cache_slot = layout.cache_slot(layer)
        # under `unrotated_shared_keys`, the slot of the unrotated keys that the layers of this
        # layer's owner (other than the owner itself) attend with; None: every layer uses cache_slot
        self.unrotated_slot = layout.unrotated_key_slot(layer) if config.unrotated_shared_keys else None
        self.query = nn.Linear(d, config.num_heads * dk, bias=bias)
        if self.owns_kv:
            self.key = nn.Linear(d, config.num_kv_heads * dk, bias=bias)
            self.value = nn.Linear(d, config.num_kv_heads * dk, bias=bias)
        self.dense = nn.Linear(config.num_heads * dk, d, bias=config.attention_out_bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, -1, self.head_dim).transpose(1, 2)  # (b, heads, s, d_k)

    def forward(self, x, cos, sin, shared_kv=None, attn_mask=None, is_causal=True, cache=None):
        """x (b, s, d) -> (out (b, s, d), the (k, v) the layers this one serves attend with, each
        (b, g, s_total, d_k): its own rotated keys, or under `unrotated_shared_keys` the unrotated ones)."""
        q = apply_rotary(self._heads(self.query(x)), cos, sin)
        if self.owns_kv:
            raw = self._heads(self.key(x))
            k, v = apply_rotary(raw, cos, sin), self._heads(self.value(x))
            if cache is not None:
                k, v = cache.update(k, v, self.cache_slot)
                if self.unrotated_slot is not None:  # keys only: a zero-width value
                    raw = cache.update(raw, raw[..., :0], self.unrotated_slot)[0]
            shared_kv = (k, v) if self.unrotated_slot is None else (raw, v)
        else:
            k, v = shared_kv
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=q.shape[1] != k.shape[1]
        )
        b, _, s, _ = out.shape
        return self.dense(out.transpose(1, 2).reshape(b, s, -1)), shared_kv


class MLP(nn.Module):
    """GPT-NeoX's MLP: dense_4h_to_h(act(dense_h_to_4h(x)))."""

    def __init__(self, config: MLKVConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act = ACT_FN[config.hidden_act]

    def forward(self, x):
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GatedMLP(nn.Module):
    """Llama's MLP: down_proj(act(gate_proj(x)) * up_proj(x))."""

    def __init__(self, config: MLKVConfig):
        super().__init__()
        d, inter, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, inter, bias=bias)
        self.up_proj = nn.Linear(d, inter, bias=bias)
        self.down_proj = nn.Linear(inter, d, bias=bias)
        self.act = ACT_FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight, normalised in float32 and scaled in the input's dtype (as
    transformers' LlamaRMSNorm, so bf16 models round alike)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def norm_class(config: MLKVConfig):
    """The family's normalisation: LayerNorm (GPT-NeoX) or RMSNorm (Llama)."""
    return RMSNorm if config.family == "llama" else nn.LayerNorm


class Block(nn.Module):
    """One layer: x + attn(ln1(x)) + mlp(ln2(x)) (parallel residual, GPT-NeoX) or the sequential
    form x' = x + attn(ln1(x)), x' + mlp(ln2(x')) (GPT-NeoX's option, Llama's only)."""

    def __init__(self, config: MLKVConfig, layer: int):
        super().__init__()
        norm = norm_class(config)
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = norm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = norm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Attention(config, layer)
        self.mlp = GatedMLP(config) if config.gated_mlp else MLP(config)

    def forward(self, x, cos, sin, shared_kv=None, attn_mask=None, is_causal=True, cache=None):
        attn, kv = self.attention(self.input_layernorm(x), cos, sin, shared_kv, attn_mask, is_causal, cache)
        if self.use_parallel_residual:
            x = self.mlp(self.post_attention_layernorm(x)) + attn + x
        else:
            x = attn + x
            x = self.mlp(self.post_attention_layernorm(x)) + x
        return x, kv


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """GPT-NeoX's (and Llama's) initialisation: normal(0, std) weights, zero biases, unit norms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, RMSNorm)):
        nn.init.ones_(module.weight)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


class MLKVTransformer(nn.Module):
    """The decoder: embed_in -> layers -> final_layer_norm -> embed_out (parameter names as GPT-NeoX's,
    for both families; conversion maps each family's names onto them)."""

    def __init__(self, config: MLKVConfig):
        super().__init__()
        self.config = config
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.final_layer_norm = norm_class(config)(config.hidden_size, eps=config.layer_norm_eps)
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.embed_out.weight = self.embed_in.weight
        self.gradient_checkpointing = False
        self.apply(functools.partial(init_weights, std=config.initializer_range))

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
    ) -> torch.Tensor:
        """input_ids (b, s) -> final hidden states (b, s, d).

        `cache` is any object with `update(k, v, slot) -> (k_all, v_all)` and `get_seq_length()`
        (transformers' DynamicCache, or ours); it receives the m owner layers' K/V only.
        """
        b, s = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + s, device=input_ids.device).unsqueeze(0)
        x = self.embed_in(input_ids)
        c = self.config
        cos, sin = rotary_cos_sin(position_ids, c.rotary_dim, c.rotary_emb_base, x.dtype, c.rope_scaling)
        attn_mask, is_causal = attention_mask_for(attention_mask, s, past + s, x.device)
        return self.final_layer_norm(self.run_layers(x, cos, sin, attn_mask, is_causal, cache))

    def run_layers(self, x, cos, sin, attn_mask=None, is_causal=True, cache=None) -> torch.Tensor:
        """The layers on x (b, s, d), each owner layer's K/V handed to the layers it serves."""
        owner_of = self.config.kv_owner
        kv = {}  # owner layer -> its (k, v), reused by the layers it serves
        for i, block in enumerate(self.layers):
            shared = None if owner_of[i] == i else kv[owner_of[i]]
            if self.gradient_checkpointing and self.training:
                # K/V leave the owner's checkpointed region as outputs and enter the served layers'
                # regions as inputs, so recomputation never crosses layers.
                x, layer_kv = checkpoint(block, x, cos, sin, shared, attn_mask, is_causal, use_reentrant=False)
            else:
                x, layer_kv = block(x, cos, sin, shared, attn_mask, is_causal, cache)
            if owner_of[i] == i:
                kv[i] = layer_kv
        return x

    def forward(self, input_ids, position_ids=None, attention_mask=None, cache=None) -> torch.Tensor:
        """input_ids (b, s) -> logits (b, s, vocab)."""
        return self.embed_out(self.hidden_states(input_ids, position_ids, attention_mask, cache))
