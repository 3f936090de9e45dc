"""The conversion math and its one pass over the layers: GPT-NeoX (Pythia) weights into an
MHA/GQA/MQA/MLKV layout.

The K/V heads of each query group are averaged, the K/V of the layers that lose theirs are merged
into their owner (mean, or the reference code's sequential merge), and every MLP is widened so the
parameter count stays at the base's. One base tensor at a time (`convert_tensors`), so converting
a checkpoint from disk peaks at the converted model plus about one layer of the base."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from ..config import ConfigError, MLKVConfig
from ..hf import CheckpointError
from ..layout import KVLayout
from .gpt_neox import split_qkv

MERGE_MODES = ("mean", "sequential")
MLP_INITS = ("zero", "copy")
# --------------------------------------------------------------------------------------------
# The math: target shape, splitting, merging, widening
# --------------------------------------------------------------------------------------------


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


def target_config(
    base: MLKVConfig,
    kv_layers: int | None = None,
    kv_groups: int | None = None,
    kv_owner: list[int] | None = None,
    match_params: bool = True,
) -> MLKVConfig:
    """The converted model's config: the base's shape, the new layout, and a matched MLP width.

    `kv_layers` (m) and `kv_groups` (g) give the paper's uniform layout; `kv_owner` an explicit map
    (layer i attends with the K/V of layer kv_owner[i]). Unset values keep the base's (MHA).
    """
    if base.layout.kv_heads_total() != base.num_layers * base.num_heads:
        raise ConfigError(
            f"the base must be multi-head (every layer owns {base.num_heads} KV heads); "
            f"it has layout {base.layout.name}"
        )
    cfg = base.with_layout(kv_layers, kv_groups, kv_owner)
    if match_params:
        cfg = base.with_layout(
            kv_layers, kv_groups, kv_owner, intermediate_size=matched_intermediate_size(base, cfg.layout)
        )
    return cfg


def group_heads(heads: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """K or V heads (h, d_k, ...) -> (g, d_k, ...) in float32: the mean of each group of h/g
    consecutive heads, the heads that will share one KV head (query head i uses KV head i // (h/g))."""
    return heads.float().reshape(num_kv_heads, -1, *heads.shape[1:]).mean(dim=1)


class LayerMerger:
    """Folds the grouped K (or V) of the layers one owner serves, in increasing layer order (owner
    first), keeping one running tensor instead of all of them.

    `mean`: the arithmetic mean over the layers. `sequential`: the reference code's pairwise fold
    `acc = (acc + next) / 2`, which weights the last layer 1/2, the one before 1/4, and so on.
    """

    def __init__(self, merge: str = "mean"):
        if merge not in MERGE_MODES:
            raise ConfigError(f"merge = '{merge}' is not supported; allowed: {', '.join(MERGE_MODES)}")
        self.merge, self.acc, self.count = merge, None, 0

    def add(self, grouped: torch.Tensor) -> None:
        if self.acc is None:
            self.acc = grouped.clone()
        elif self.merge == "mean":
            self.acc += grouped
        else:
            self.acc = (self.acc + grouped) / 2
        self.count += 1

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        """The merged (g·d_k, ...) tensor in `dtype`."""
        merged = self.acc / self.count if self.merge == "mean" else self.acc
        return merged.reshape(-1, *merged.shape[2:]).to(dtype)


def merge_kv(per_layer: list[torch.Tensor], num_kv_heads: int, merge: str = "mean") -> torch.Tensor:
    """Merge K (or V) heads (h, d_k, ...) of the layers an owner serves (owner first) into (g·d_k, ...).

    Heads of one query group are averaged (the GQA recipe). Layers are averaged with equal weights
    (`mean`) or folded in one at a time with a pairwise mean (`sequential`, the reference code's
    behaviour, which weights upper layers more).
    """
    merger = LayerMerger(merge)
    for t in per_layer:
        merger.add(group_heads(t, num_kv_heads))
    return merger.result(per_layer[0].dtype)


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


# --------------------------------------------------------------------------------------------
# The conversion core: one pass over the layers, one base tensor at a time
# --------------------------------------------------------------------------------------------


def _owned(t: torch.Tensor) -> torch.Tensor:
    """`t`, copied if it is a view into a larger tensor (e.g. Q of a fused QKV with h = 1), so the
    output neither keeps the base's fused tensor alive nor shares storage when saved."""
    if t.device.type != "meta" and t.untyped_storage().nbytes() > t.numel() * t.element_size():
        return t.clone()
    return t


def _expect_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(t.shape) != shape:
        raise CheckpointError(f"tensor '{name}' has shape {tuple(t.shape)}, but the config implies {shape}")
    return t


def _layer_tensors(
    get: Callable[[str], torch.Tensor],
    base: MLKVConfig,
    target: MLKVConfig,
    prefix: str,
    layer: int,
    mlp_init: str,
    cast: Callable[[torch.Tensor], torch.Tensor],
    fold: Callable[[str, str, torch.Tensor], None],
) -> dict:
    """All of one layer's output tensors except its merged K/V: layer norms, Q, attention output
    and the widened MLP. The layer's K and V heads (h, d_k, ...) go to `fold(kind, part, heads)`."""
    h, d, dk = base.num_heads, base.hidden_size, base.head_dim
    p, out = f"{prefix}layers.{layer}.", f"layers.{layer}."
    sd = {}
    for name in ("input_layernorm", "post_attention_layernorm"):
        for kind in ("weight", "bias"):
            sd[f"{out}{name}.{kind}"] = cast(get(f"{p}{name}.{kind}"))
    for kind in ("weight", "bias") if base.attention_bias else ("weight",):
        name = f"{p}attention.query_key_value.{kind}"
        qkv = _expect_shape(name, get(name), (3 * h * dk, d) if kind == "weight" else (3 * h * dk,))
        q, k, v = split_qkv(qkv, h)
        sd[f"{out}attention.query.{kind}"] = cast(q.reshape(-1, *q.shape[2:]))
        fold(kind, "key", k)
        fold(kind, "value", v)
        del qkv, q, k, v  # the fused tensor is the layer's largest: free it before reading the MLP
        sd[f"{out}attention.dense.{kind}"] = cast(get(f"{p}attention.dense.{kind}"))
    w_in, b_in, w_out = widen_mlp(
        get(f"{p}mlp.dense_h_to_4h.weight"),
        get(f"{p}mlp.dense_h_to_4h.bias"),
        get(f"{p}mlp.dense_4h_to_h.weight"),
        target.intermediate_size,
        mlp_init,
    )
    sd[f"{out}mlp.dense_h_to_4h.weight"], sd[f"{out}mlp.dense_h_to_4h.bias"] = cast(w_in), cast(b_in)
    sd[f"{out}mlp.dense_4h_to_h.weight"] = cast(w_out)
    sd[f"{out}mlp.dense_4h_to_h.bias"] = cast(get(f"{p}mlp.dense_4h_to_h.bias"))
    return sd


def convert_tensors(
    get: Callable[[str], torch.Tensor],
    base: MLKVConfig,
    target: MLKVConfig,
    merge: str = "mean",
    mlp_init: str = "zero",
    prefix: str = "gpt_neox.",
    head_names: tuple[str, ...] = ("embed_out.weight", "lm_head.weight"),
    has: Callable[[str], bool] | None = None,
    dtype: torch.dtype | None = None,
    layers: Iterable[int] | None = None,
    release: Callable[[], None] | None = None,
) -> dict:
    """Convert GPT-NeoX tensors fetched by name with `get` into an `MLKVTransformer` state dict.

    Each base tensor is fetched once, in layer order: a layer's Q, attention output and MLP are
    converted as soon as it is read, and its grouped K/V heads are folded into its owner's running
    merge, which is emitted after the owner's last served layer. Besides the output, only one
    layer's base tensors and the running K/V merges (g heads each) are alive.

    `has(name)` tells which of `head_names` (the output head, untied models) exists; `dtype` casts
    the output (default: the dtype of the base's embedding); `layers` is `range(l)`, possibly
    wrapped in a progress bar; `release()` is called after the embeddings and after each layer (the
    reader drops what it keeps mapped).
    """
    release = release or (lambda: None)
    if mlp_init not in MLP_INITS:
        raise ConfigError(f"mlp_init = '{mlp_init}' is not supported; allowed: {', '.join(MLP_INITS)}")
    layout, g, d = target.layout, target.num_kv_heads, base.hidden_size
    embed = _expect_shape(f"{prefix}embed_in.weight", get(f"{prefix}embed_in.weight"), (base.vocab_size, d))
    dtype = dtype or embed.dtype

    def cast(t: torch.Tensor) -> torch.Tensor:
        return _owned(t).to(dtype) if t.is_floating_point() else _owned(t)

    sd = {"embed_in.weight": cast(embed)}
    if target.tie_word_embeddings:
        sd["embed_out.weight"] = sd["embed_in.weight"]
    else:
        head = next((n for n in head_names if has is None or has(n)), None)
        if head is None:
            raise CheckpointError(
                f"no output head ({' or '.join(head_names)}) and tie_word_embeddings is "
                f"false: a bare GPTNeoXModel checkpoint cannot be converted"
            )
        sd["embed_out.weight"] = cast(_expect_shape(head, get(head), (base.vocab_size, d)))
    for kind in ("weight", "bias"):
        sd[f"final_layer_norm.{kind}"] = cast(get(f"{prefix}final_layer_norm.{kind}"))
    release()

    kinds = ("weight", "bias") if base.attention_bias else ("weight",)
    last_served = {o: max(layout.served_layers(o)) for o in layout.owners}
    mergers = {}  # (owner, kind, part) -> LayerMerger, alive from the owner to its last served layer
    for i in layers if layers is not None else range(base.num_layers):
        owner = layout.kv_owner[i]

        def fold(kind: str, part: str, heads: torch.Tensor, owner: int = owner) -> None:
            mergers.setdefault((owner, kind, part), LayerMerger(merge)).add(group_heads(heads, g))

        sd.update(_layer_tensors(get, base, target, prefix, i, mlp_init, cast, fold))
        if last_served[owner] == i:  # every layer `owner` serves has been folded in
            for kind in kinds:
                for part in ("key", "value"):
                    sd[f"layers.{owner}.attention.{part}.{kind}"] = mergers.pop((owner, kind, part)).result(dtype)
        release()
    return sd


def convert_layer(
    base_sd: dict,
    prefix: str,
    base: MLKVConfig,
    target: MLKVConfig,
    layer: int,
    served: list[dict] | None,
    merge: str = "mean",
    mlp_init: str = "zero",
) -> dict:
    """One layer's tensors in MLKV names. `served`: the base tensors of the layers this owner serves
    (owner first, keys relative to the layer, e.g. `attention.query_key_value.weight`), or None
    when `layer` does not own K/V."""
    sd = _layer_tensors(
        base_sd.__getitem__, base, target, prefix, layer, mlp_init, _owned, lambda kind, part, heads: None
    )
    for kind in (("weight", "bias") if base.attention_bias else ("weight",)) if served is not None else ():
        ks, vs = zip(*(split_qkv(s[f"attention.query_key_value.{kind}"], base.num_heads)[1:] for s in served))
        sd[f"layers.{layer}.attention.key.{kind}"] = merge_kv(list(ks), target.num_kv_heads, merge)
        sd[f"layers.{layer}.attention.value.{kind}"] = merge_kv(list(vs), target.num_kv_heads, merge)
    return sd


def convert_state_dict(
    base_sd: dict,
    base: MLKVConfig,
    target: MLKVConfig,
    merge: str = "mean",
    mlp_init: str = "zero",
    prefix: str = "gpt_neox.",
) -> dict:
    """A transformers `GPTNeoXForCausalLM` state dict -> an `MLKVTransformer` state dict for `target`.

    The output head is read from `lm_head.weight` (transformers 5 in memory) or `embed_out.weight`
    (checkpoint files); with tied embeddings it is `embed_in`.
    """

    def get(name: str) -> torch.Tensor:
        if name not in base_sd:
            raise CheckpointError(f"the state dict has no tensor '{name}'")
        return base_sd[name]

    return convert_tensors(
        get,
        base,
        target,
        merge,
        mlp_init,
        prefix,
        head_names=("lm_head.weight", "embed_out.weight"),
        has=base_sd.__contains__,
    )
