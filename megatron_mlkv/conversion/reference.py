"""The MLKV paper's reference checkpoints (the pythia-mlkv code; its released Pythia-160M/410M models).

Their config.json says `model_type: gpt_neox` and adds `num_key_value_layers` (m),
`num_key_value_heads` (g) and `use_key_value_mlp`; `intermediate_size` is already the widened one.
Owners sit where `layout.uniform_owners` puts them. Each layer has separate `query`, `dense` and (owner
layers only) `key`, `value` Linears with biases, plus buffers (`attention.bias`, `attention.masked_bias`,
`attention.rotary_emb.inv_freq`) that hold no learned values. Served layers attend with their owner's
keys taken before the rotary embedding, so a converted model sets `unrotated_shared_keys`.

transformers reads such a folder as a plain GPT-NeoX and initialises its attention at random (with
warnings only), so every tool that loads a checkpoint asks `is_reference_config` first.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from ..config import ConfigError, MLKVConfig
from ..errors import CheckpointError
from ..layout import KVLayout, LayoutError
from .family import expect_shape

FORMAT = "pythia-mlkv"  # the name reports give the format
LAYER_KEYS = "num_key_value_layers"
HEAD_KEYS = "num_key_value_heads"


def is_reference_config(hf_config) -> bool:
    """True for a transformers config of the reference code: GPT-NeoX plus `num_key_value_layers`."""
    return getattr(hf_config, "model_type", None) == "gpt_neox" and getattr(hf_config, LAYER_KEYS, None) is not None


def reference_config(hf_config, name: str = "") -> MLKVConfig:
    """The `MLKVConfig` of a reference config: its m, g and MLP width, `unrotated_shared_keys` on.

    A ConfigError (one line, naming `name` and the key) for what has no faithful mapping: the key/value
    MLP variant, or m and g that do not fit the shape.
    """
    where = f"{name}: " if name else ""
    if getattr(hf_config, "use_key_value_mlp", False):
        raise ConfigError(
            f"{where}use_key_value_mlp = true (the reference code's key/value MLP variant) has no counterpart "
            f"here; only checkpoints with linear key/value projections convert"
        )
    l, h = hf_config.num_hidden_layers, hf_config.num_attention_heads
    m, g = getattr(hf_config, LAYER_KEYS), getattr(hf_config, HEAD_KEYS, None)
    g = h if g is None else g
    for key, value in ((LAYER_KEYS, m), (HEAD_KEYS, g)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{where}{key} = {value!r} must be an integer")
    try:
        layout = KVLayout.uniform(l, h, m, g)
    except LayoutError as e:
        raise ConfigError(f"{where}{e}") from None
    try:
        return MLKVConfig.from_hf(hf_config, num_kv_heads=g, kv_owner=layout.kv_owner, unrotated_shared_keys=True)
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None


def reference_tensors(
    get: Callable[[str], torch.Tensor],
    config: MLKVConfig,
    prefix: str = "gpt_neox.",
    has: Callable[[str], bool] | None = None,
    dtype: torch.dtype | None = None,
    layers: Iterable[int] | None = None,
    release: Callable[[], None] | None = None,
) -> dict:
    """An `MLKVTransformer` state dict from a reference checkpoint's tensors, fetched by name with `get`
    (one at a time, shapes checked against `config`). The names map one to one; a served layer that
    carries key/value weights means the config and the weights disagree, which is an error.
    `dtype` casts (default: the embedding's); `release()` runs after each layer."""
    release = release or (lambda: None)
    has = has or (lambda name: True)
    fetch = lambda name, shape: expect_shape(name, get(name), shape)
    d, dk, h, g = config.hidden_size, config.head_dim, config.num_heads, config.num_kv_heads
    inter, v = config.intermediate_size, config.vocab_size
    embed = fetch(f"{prefix}embed_in.weight", (v, d))
    dtype = dtype or embed.dtype
    cast = lambda t: t.to(dtype, copy=True)
    sd = {"embed_in.weight": cast(embed)}
    if config.tie_word_embeddings:
        sd["embed_out.weight"] = sd["embed_in.weight"]
    else:
        head = next((n for n in ("embed_out.weight", "lm_head.weight") if has(n)), "embed_out.weight")
        sd["embed_out.weight"] = cast(fetch(head, (v, d)))
    for kind in ("weight", "bias"):
        sd[f"final_layer_norm.{kind}"] = cast(fetch(f"{prefix}final_layer_norm.{kind}", (d,)))
    release()
    shapes = {
        "input_layernorm": ((d,), (d,)),
        "post_attention_layernorm": ((d,), (d,)),
        "attention.query": ((h * dk, d), (h * dk,)),
        "attention.dense": ((d, h * dk), (d,)),
        "mlp.dense_h_to_4h": ((inter, d), (inter,)),
        "mlp.dense_4h_to_h": ((d, inter), (d,)),
    }
    kv_shapes = {"attention.key": ((g * dk, d), (g * dk,)), "attention.value": ((g * dk, d), (g * dk,))}
    for i in layers if layers is not None else range(config.num_layers):
        p = f"{prefix}layers.{i}."
        owns = config.layout.owns_kv(i)
        if not owns and has(f"{p}attention.key.weight"):
            raise CheckpointError(
                f"tensor '{p}attention.key.weight' exists, but layer {i} does not own K/V under "
                f"{LAYER_KEYS} = {config.layout.kv_layers} (owners {list(config.layout.owners)})"
            )
        for module, (w_shape, b_shape) in {**shapes, **(kv_shapes if owns else {})}.items():
            for kind, shape in (("weight", w_shape), ("bias", b_shape)):
                if kind == "bias" and not config.attention_bias and module.startswith("attention."):
                    continue
                sd[f"layers.{i}.{module}.{kind}"] = cast(fetch(f"{p}{module}.{kind}", shape))
        release()
    return sd


def is_reference_folder(path) -> bool:
    """True for a local folder whose config.json is the reference format (read as plain JSON)."""
    config = Path(path) / "config.json"
    try:
        values = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(values, dict) and values.get("model_type") == "gpt_neox" and LAYER_KEYS in values
