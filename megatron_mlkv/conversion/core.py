"""The conversion math and its one pass over the layers: a GPT-NeoX (Pythia) or Llama-family (Llama,
Qwen2, Mistral) checkpoint into an MHA/GQA/MQA/MLKV layout.

The base's K/V heads of each target group are averaged (g_b of them into g; g_b = h for a multi-head
base), the K/V of the layers that lose theirs are merged into their owner (mean, or the reference
code's sequential merge), and every MLP is widened so the parameter count stays at the base's (two
matrices grow in GPT-NeoX's MLP, three in Llama's gated one). One base tensor at a time
(`convert_tensors`), so converting a checkpoint from disk peaks at the converted model plus about
one layer of the base. Where a family keeps its tensors: `family.Family` (gpt_neox.py, llama.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from ..config import ConfigError, MLKVConfig
from ..errors import CheckpointError
from ..layout import KVLayout
from .family import Family, expect_shape
from .gpt_neox import GPT_NEOX, split_qkv
from .llama import LLAMA

MERGE_MODES = ("mean", "sequential")
MLP_INITS = ("zero", "copy")
# --------------------------------------------------------------------------------------------
# The math: target shape, splitting, merging, widening
# --------------------------------------------------------------------------------------------


FAMILIES = {"gpt_neox": GPT_NEOX, "llama": LLAMA}


def family_of(config: MLKVConfig) -> Family:
    return FAMILIES[config.family]


def matched_intermediate_size(base: MLKVConfig, layout: KVLayout, multiple: int = 1) -> int:
    """The MLP width that keeps the parameter count of `base` after moving to `layout`.

    The paper's rule (its Table 2): parameters lost = lost KV heads · (2·d·d_k + 2·d_k), per layer
    = lost // l, intermediate += round(per_layer / d) // 2. A gated MLP grows three matrices a unit
    (and two biases with `mlp_bias`): intermediate += round(per_layer / (3·d + 2·mlp_bias)).
    `multiple` rounds a widened MLP to the nearest multiple (never below the base's width, which an
    unchanged MLP keeps): matrix shapes the GPU's kernels tile without a ragged edge, and float8
    matmuls need multiples of 16; the parameter count then matches within half a multiple of MLP
    units a layer.
    """
    if multiple < 1:
        raise ConfigError(f"mlp_multiple = {multiple} must be >= 1")
    d, dk = base.hidden_size, base.head_dim
    lost_heads = base.layout.kv_heads_total() - layout.kv_heads_total()
    if not base.gated_mlp:
        per_layer = lost_heads * (2 * d * dk + 2 * dk) // base.num_layers
        width = base.intermediate_size + round(per_layer / d) // 2
    else:
        per_layer = lost_heads * 2 * (d + int(base.attention_bias)) * dk / base.num_layers
        width = base.intermediate_size + round(per_layer / (3 * d + 2 * int(base.mlp_bias)))
    if width == base.intermediate_size:  # nothing to widen (the base's own layout): the base's width
        return width
    return max(base.intermediate_size, multiple * round(width / multiple))


def target_config(
    base: MLKVConfig,
    kv_layers: int | None = None,
    kv_groups: int | None = None,
    kv_owner: list[int] | None = None,
    match_params: bool = True,
    mlp_multiple: int = 1,
) -> MLKVConfig:
    """The converted model's config: the base's shape, the new layout, and a matched MLP width
    (rounded to a multiple of `mlp_multiple`: `matched_intermediate_size`).

    `kv_layers` (m) and `kv_groups` (g) give the paper's uniform layout; `kv_owner` an explicit map
    (layer i attends with the K/V of layer kv_owner[i]). Unset values keep the base's (its g_b KV
    heads in every layer). g must divide g_b: each target K/V head is the mean of g_b/g base heads.
    """
    if base.layout.kv_layers != base.num_layers:
        raise ConfigError(
            f"the base must own K/V in every layer; it has layout {base.layout.name} (m = {base.layout.kv_layers})"
        )
    cfg = base.with_layout(kv_layers, kv_groups, kv_owner)
    g, g_b = cfg.num_kv_heads, base.num_kv_heads
    if g_b % g:
        allowed = ", ".join(str(x) for x in range(1, g_b + 1) if g_b % x == 0)
        raise ConfigError(
            f"kv_groups (g) = {g} must divide the base's {g_b} KV heads (each target head is the mean of g_b / g "
            f"of them); allowed: {allowed}"
        )
    if match_params:
        cfg = base.with_layout(
            kv_layers,
            kv_groups,
            kv_owner,
            intermediate_size=matched_intermediate_size(base, cfg.layout, mlp_multiple),
        )
    return cfg


def group_heads(heads: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """K or V heads (g_b, d_k, ...) -> (g, d_k, ...) in float32: the mean of each group of g_b/g
    consecutive heads, the heads whose queries will share one KV head (query head i uses KV head
    i // (h/g) after, i // (h/g_b) before; g_b = h for a multi-head base)."""
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


def widen_mlp(inputs: dict, output: torch.Tensor, size: int, mlp_init: str = "zero") -> tuple[dict, torch.Tensor]:
    """Grow an MLP to `size` units: `inputs` {name: tensor whose first dimension is the unit} (the
    input weights (I, d) and biases (I,): GPT-NeoX's dense_h_to_4h, Llama's gate_proj and up_proj),
    `output` the output weight (d, I).

    New units copy the input weights of the first units; their output weights are zero (`zero`: the
    widened MLP computes exactly what it did) or copied too (`copy`, the reference code's choice).
    """
    if mlp_init not in MLP_INITS:
        raise ConfigError(f"mlp_init = '{mlp_init}' is not supported; allowed: {', '.join(MLP_INITS)}")
    units = output.shape[1]
    extra = size - units
    if extra < 0:
        raise ConfigError(f"cannot shrink the MLP from {units} to {size} units")
    if extra == 0:
        return inputs, output
    src = torch.arange(extra) % units
    new_out = output[:, src] if mlp_init == "copy" else torch.zeros_like(output[:, :extra])
    return {k: torch.cat([t, t[src]]) for k, t in inputs.items()}, torch.cat([output, new_out], dim=1)


# --------------------------------------------------------------------------------------------
# The conversion core: one pass over the layers, one base tensor at a time
# --------------------------------------------------------------------------------------------


def _owned(t: torch.Tensor) -> torch.Tensor:
    """`t`, copied if it is a view into a larger tensor (e.g. Q of a fused QKV with h = 1), so the
    output neither keeps the base's fused tensor alive nor shares storage when saved."""
    if t.device.type != "meta" and t.untyped_storage().nbytes() > t.numel() * t.element_size():
        return t.clone()
    return t


# the MLP's input-side modules (one row a unit) and output module, by whether it is gated
MLP_MODULES = {
    False: (("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h"),
    True: (("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),
}


def _layer_tensors(
    get: Callable[[str], torch.Tensor],
    family: Family,
    base: MLKVConfig,
    target: MLKVConfig,
    prefix: str,
    layer: int,
    mlp_init: str,
    cast: Callable[[torch.Tensor], torch.Tensor],
    fold: Callable[[str, str, torch.Tensor], None],
) -> dict:
    """All of one layer's output tensors except its merged K/V: norms, Q, attention output and the
    widened MLP. The layer's K and V heads (g_b, d_k, ...) go to `fold(kind, part, heads)`."""
    tensors = family.read_layer(get, base, prefix, layer)
    inputs, output = MLP_MODULES[base.gated_mlp]
    out, sd, mlp_in = f"layers.{layer}.", {}, {}
    for name, t in tensors.items():
        module, _, kind = name.rpartition(".")
        if module in ("attention.key", "attention.value"):
            fold(kind, module.rpartition(".")[2], t)
        elif module in inputs:
            mlp_in[name] = t
        elif name != f"{output}.weight":
            sd[out + name] = cast(t)
    mlp_in, w_out = widen_mlp(mlp_in, tensors[f"{output}.weight"], target.intermediate_size, mlp_init)
    sd.update({out + name: cast(t) for name, t in mlp_in.items()})
    sd[f"{out}{output}.weight"] = cast(w_out)
    return sd


def convert_tensors(
    get: Callable[[str], torch.Tensor],
    base: MLKVConfig,
    target: MLKVConfig,
    merge: str = "mean",
    mlp_init: str = "zero",
    prefix: str | None = None,
    head_names: tuple[str, ...] | None = None,
    has: Callable[[str], bool] | None = None,
    dtype: torch.dtype | None = None,
    layers: Iterable[int] | None = None,
    release: Callable[[], None] | None = None,
) -> dict:
    """Convert a checkpoint's tensors, fetched by name with `get`, into an `MLKVTransformer` state dict.

    Each base tensor is fetched once, in layer order: a layer's Q, attention output and MLP are
    converted as soon as it is read, and its grouped K/V heads are folded into its owner's running
    merge, which is emitted after the owner's last served layer. Besides the output, only one
    layer's base tensors and the running K/V merges (g heads each) are alive.

    `prefix` and `head_names` default to the base family's (`family.Family`); `has(name)` tells
    which of `head_names` (the output head, untied models) exists; `dtype` casts the output
    (default: the dtype of the base's embedding); `layers` is `range(l)`, possibly wrapped in a
    progress bar; `release()` is called after the embeddings and after each layer (the reader drops
    what it keeps mapped).
    """
    family = family_of(base)
    prefix = family.prefixes[0] if prefix is None else prefix
    head_names = head_names or family.heads
    release = release or (lambda: None)
    if mlp_init not in MLP_INITS:
        raise ConfigError(f"mlp_init = '{mlp_init}' is not supported; allowed: {', '.join(MLP_INITS)}")
    layout, g, d = target.layout, target.num_kv_heads, base.hidden_size
    embed = expect_shape(f"{prefix}{family.embed}", get(f"{prefix}{family.embed}"), (base.vocab_size, d))
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
                f"false: a bare decoder checkpoint cannot be converted"
            )
        sd["embed_out.weight"] = cast(expect_shape(head, get(head), (base.vocab_size, d)))
    for kind in ("weight",) if base.family == "llama" else ("weight", "bias"):  # RMSNorm has no shift
        sd[f"final_layer_norm.{kind}"] = cast(get(f"{prefix}{family.final_norm}.{kind}"))
    release()

    kinds = ("weight", "bias") if base.attention_bias else ("weight",)
    last_served = {o: max(layout.served_layers(o)) for o in layout.owners}
    mergers = {}  # (owner, kind, part) -> LayerMerger, alive from the owner to its last served layer
    for i in layers if layers is not None else range(base.num_layers):
        owner = layout.kv_owner[i]

        def fold(kind: str, part: str, heads: torch.Tensor, owner: int = owner) -> None:
            mergers.setdefault((owner, kind, part), LayerMerger(merge)).add(group_heads(heads, g))

        sd.update(_layer_tensors(get, family, base, target, prefix, i, mlp_init, cast, fold))
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
    """One layer of a GPT-NeoX state dict in MLKV names. `served`: the base tensors of the layers this
    owner serves (owner first, keys relative to the layer, e.g. `attention.query_key_value.weight`),
    or None when `layer` does not own K/V."""
    sd = _layer_tensors(
        base_sd.__getitem__, GPT_NEOX, base, target, prefix, layer, mlp_init, _owned, lambda kind, part, heads: None
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
    prefix: str | None = None,
) -> dict:
    """A transformers `GPTNeoXForCausalLM` (or `LlamaForCausalLM`, `Qwen2ForCausalLM`,
    `MistralForCausalLM`) state dict -> an `MLKVTransformer` state dict for `target`.

    The output head is read from `lm_head.weight` (transformers 5 in memory) or `embed_out.weight`
    (GPT-NeoX checkpoint files); with tied embeddings it is `embed_in`.
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
