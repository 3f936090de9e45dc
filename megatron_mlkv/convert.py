"""Convert a GPT-NeoX (Pythia) checkpoint into an MHA/GQA/MQA/MLKV layout.

GPT-NeoX fuses Q, K, V per head: the rows of `query_key_value` are `[h, 3, d_k]`. Conversion splits
them, averages the K/V heads of each query group, averages the K/V of the layers that lose theirs
into their owner, and widens every MLP so the parameter count stays at the base's.

Two entry points share one conversion core (`convert_tensors`):

- `convert_state_dict`: an in-memory `GPTNeoXForCausalLM` state dict -> an `MLKVTransformer` one.
- `convert_checkpoint` / `convert_paper_variants`: a transformers folder or hub name -> exported
  folder(s), reading the base's weight files one tensor at a time (see `BaseCheckpoint`), so the
  peak memory is the converted model plus about one layer of the base.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ConfigError, MLKVConfig
from .hf import TOKENIZER_FILES, CheckpointError, export_pretrained, special_token_ids
from .layout import KVLayout
from .model import MLKVTransformer

MERGE_MODES = ("mean", "sequential")
MLP_INITS = ("zero", "copy")
SUPPORTED = "GPTNeoXForCausalLM (model_type 'gpt_neox': Pythia, GPT-NeoX)"
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
REPORT_NAME = "conversion_report.json"
# Weight files in the order transformers prefers them: safetensors over pickles, index over single.
WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
# The paper's eight Pythia-160M variants (its Table 2) as functions of (l, h): name, m(l), g(h). The
# pairs GQA-48/MLKV-48 and MQA-12/MLKV-12 keep equal KV budgets (l·h/3 and l heads) for any shape.
PAPER_LAYOUTS = (
    ("GQA-48", lambda l: l, lambda h: h // 3),
    ("MLKV-48", lambda l: l // 3, lambda h: h),
    ("MQA-12", lambda l: l, lambda h: 1),
    ("MLKV-12", lambda l: l // 3, lambda h: 3),
    ("MLKV-6", lambda l: l // 2, lambda h: 1),
    ("MLKV-4", lambda l: l // 3, lambda h: 1),
    ("MLKV-2", lambda l: l // 6, lambda h: 1),
    ("MLKV-1", lambda l: 1, lambda h: 1),
)


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


def split_qkv(tensor: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPT-NeoX `query_key_value` weight (3·h·d_k, d) or bias (3·h·d_k,) -> q, k, v of shape (h, d_k, ...)."""
    per_head = tensor.reshape(num_heads, 3, -1, *tensor.shape[1:])
    return per_head[:, 0], per_head[:, 1], per_head[:, 2]


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


# --------------------------------------------------------------------------------------------
# Reading a base checkpoint: config, weight files, tokenizer
# --------------------------------------------------------------------------------------------


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# safetensors dtype codes (the format's header) -> torch dtypes
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class _SafetensorsFile:
    """One .safetensors file read with plain file reads into private memory.

    Not `safe_open(...).get_tensor`: that returns views of a memory map of the whole file, which
    stays mapped while any tensor from it lives, so every page the conversion touches stays in the
    process's resident memory until the end and the peak reaches base + output. `safe_open` is still
    used once to validate the header (a truncated file fails there).
    """

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        try:
            with safe_open(str(path), framework="pt"):
                pass
            with open(path, "rb") as f:
                size = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(size))
        except Exception as e:  # SafetensorError for a truncated or damaged file
            raise CheckpointError(f"{path}: corrupt or unreadable weight file ({_first_line(e)})") from None
        header.pop("__metadata__", None)
        self.entries, self.data_start = header, 8 + size
        self._file = open(path, "rb")

    def keys(self):
        return self.entries.keys()

    def get_tensor(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{self.path}: tensor '{name}' has dtype {entry['dtype']}, which conversion "
                f"does not read; allowed: {', '.join(SAFETENSORS_DTYPES)}"
            )
        dtype, (begin, end) = SAFETENSORS_DTYPES[entry["dtype"]], entry["data_offsets"]
        if end == begin:
            return torch.empty(entry["shape"], dtype=dtype)
        data = torch.empty(end - begin, dtype=torch.uint8)  # uninitialised: the read fills it
        self._file.seek(self.data_start + begin)
        if self._file.readinto(data.numpy()) != end - begin:
            raise CheckpointError(f"{self.path}: truncated while reading tensor '{name}'")
        return data.view(dtype).reshape(entry["shape"])

    def dtype(self, name: str) -> torch.dtype | None:
        return SAFETENSORS_DTYPES.get(self.entries[name]["dtype"])

    def release(self) -> None:
        """Nothing is mapped: reads leave no pages in the process."""

    def close(self) -> None:
        self._file.close()


class _PickleFile:
    """One `pytorch_model.bin` (torch.save zip), memory-mapped and copied out tensor by tensor.

    Every tensor of a mapped pickle is a view of one mapping of the whole file, and the pages read
    stay resident until the mapping goes; `release()` drops it (after each layer), and the next
    `get_tensor` maps the file again (cheap: only the pickle's index is read). Legacy non-zip
    pickles cannot be mapped and are loaded whole once.
    """

    def __init__(self, path: Path):
        self.path = path
        self.mappable = True
        self._state = self._load()
        self._keys = list(self._state)

    def _load(self) -> dict:
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=self.mappable)
        except Exception as mmap_error:  # legacy pickles cannot be mapped; damaged zips fail both ways
            try:
                state, self.mappable = torch.load(self.path, map_location="cpu", weights_only=True), False
            except Exception:
                raise CheckpointError(
                    f"{self.path}: corrupt or unreadable weight file ({_first_line(mmap_error)})"
                ) from None
        if not isinstance(state, dict):
            raise CheckpointError(
                f"{self.path}: expected a state dict (tensor name -> tensor), found {type(state).__name__}"
            )
        return state

    def keys(self):
        return self._keys

    def get_tensor(self, name: str) -> torch.Tensor:
        if self._state is None:
            self._state = self._load()
        tensor = self._state[name]
        return tensor.clone() if self.mappable else tensor

    def dtype(self, name: str) -> torch.dtype:
        if self._state is None:
            self._state = self._load()
        return self._state[name].dtype

    def release(self) -> None:
        if self.mappable:
            self._state = None

    def close(self) -> None:
        self._state = None


def _return_freed_memory() -> None:
    """Give memory freed by the last layer back to the OS (glibc only; elsewhere a no-op).

    glibc serves blocks under its (adaptive, up to 32 MB) mmap threshold from the heap, and a
    layer's freed transients (the fused QKV, float32 copies) sit between blocks the output keeps,
    so without a trim they stay resident: measured on a 1.4B fp16 checkpoint, the peak drops from
    1.43x to 1.04x the checkpoint size.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (e.g. musl)
            pass


class WeightReader:
    """Tensors of a checkpoint's weight files (safetensors or `pytorch_model.bin`, sharded or not),
    read one at a time on request into private memory; `release()` returns what reading left
    resident (call it after each layer). Every error names the file."""

    def __init__(self, files: list[Path]):
        self.files = [Path(f) for f in files]
        self._where: dict[str, int] = {}  # tensor name -> index into self.files / self._handles
        self._handles: list = []
        try:
            for index, path in enumerate(self.files):
                if not path.is_file():
                    raise CheckpointError(f"{path}: missing weight file")
                handle = _SafetensorsFile(path) if path.name.endswith(".safetensors") else _PickleFile(path)
                self._handles.append(handle)
                for name in handle.keys():
                    self._where[name] = index
        except BaseException:
            self.close()
            raise

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name`; a CheckpointError naming the files if it is absent or unreadable."""
        if name not in self._where:
            where = self.files[0].parent
            raise CheckpointError(
                f"{where}: tensor '{name}' is missing from the weight files ({', '.join(f.name for f in self.files)})"
            )
        index = self._where[name]
        try:
            tensor = self._handles[index].get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{self.files[index]}: cannot read tensor '{name}' ({_first_line(e)})") from None
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"{self.files[index]}: tensor '{name}' holds NaN or infinite values; "
                f"a base with non-finite weights cannot be converted"
            )
        return tensor

    def dtype(self, name: str) -> torch.dtype | None:
        """The stored dtype of tensor `name`, without reading it."""
        return self._handles[self._where[name]].dtype(name) if name in self._where else None

    def release(self) -> None:
        for handle in self._handles:
            handle.release()
        _return_freed_memory()

    def close(self) -> None:
        for handle in self._handles:
            handle.close()
        self._handles.clear()
        self._where.clear()


def _looks_local(base: str) -> bool:
    """True for an existing path or one that cannot be a hub name ('owner/name' or 'name')."""
    text = str(base)
    return (
        Path(text).expanduser().exists()
        or text.startswith(("/", ".", "~", "\\"))
        or text.count("/") > 1
        or os.sep != "/"
        and os.sep in text
    )


def _resolve(base: str, filename: str, local: bool) -> Path | None:
    """The local path of `filename` in the base (downloaded for hub names), or None if absent."""
    if local:
        path = Path(base).expanduser() / filename
        return path if path.is_file() else None
    from transformers.utils import cached_file

    try:
        found = cached_file(base, filename, _raise_exceptions_for_missing_entries=False)
    except Exception as e:  # no network, gated or unknown repository
        raise CheckpointError(f"{base}: cannot fetch {filename} from the hub ({_first_line(e)})") from None
    return Path(found) if found else None


def weight_files(base: str, local: bool | None = None) -> list[Path]:
    """The base's weight files, in transformers' order of preference: sharded or single safetensors,
    then sharded or single `pytorch_model.bin`. A shard listed in an index must exist."""
    local = _looks_local(base) if local is None else local
    for filename in WEIGHT_FILES:
        path = _resolve(base, filename, local)
        if path is None:
            continue
        if not filename.endswith(".index.json"):
            return [path]
        try:
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{path}: corrupt index file ({_first_line(e)})") from None
        files = []
        for shard in shards:
            found = _resolve(base, shard, local)
            if found is None:
                missing = Path(base) / shard if local else f"{base}/{shard}"
                raise CheckpointError(f"{missing}: missing weight file (listed in {filename})")
            files.append(found)
        return files
    raise CheckpointError(f"{base}: no weight file; expected one of {', '.join(WEIGHT_FILES)}")


def _peek_model_type(base: str, local: bool) -> str | None:
    """`model_type` from config.json read as plain JSON, before transformers (which refuses unknown
    types and asks about remote code) sees it; None if it cannot be read."""
    try:
        path = _resolve(base, "config.json", local)
        return json.loads(path.read_text()).get("model_type") if path else None
    except (CheckpointError, OSError, ValueError, AttributeError):
        return None


def load_base_config(base: str, local: bool | None = None):
    """`AutoConfig.from_pretrained(base)`, refusing anything but GPT-NeoX with a one-line error."""
    from transformers import AutoConfig

    local = _looks_local(base) if local is None else local
    if local and not Path(base).expanduser().is_dir():
        raise CheckpointError(f"{base}: no such folder (and not a hub model name)")
    if local and not (Path(base).expanduser() / "config.json").is_file():
        raise CheckpointError(f"{base}: no config.json; expected a transformers folder of {SUPPORTED}")
    model_type = _peek_model_type(base, local)
    if model_type not in (None, "gpt_neox"):
        _refuse(base, model_type, _peek_architectures(base, local))
    try:
        # trust_remote_code=False: a folder with custom code is refused, never run or prompted for
        hf_config = AutoConfig.from_pretrained(str(Path(base).expanduser()) if local else base, trust_remote_code=False)
    except Exception as e:  # no network, unknown repository, damaged config.json
        where = "" if local else "not a local folder, and the hub cannot provide it: "
        raise CheckpointError(f"{base}: {where}cannot read the config ({_first_line(e)})") from None
    if hf_config.model_type != "gpt_neox":
        _refuse(base, hf_config.model_type, getattr(hf_config, "architectures", None))
    return hf_config


def _peek_architectures(base: str, local: bool) -> list[str] | None:
    try:
        archs = json.loads(_resolve(base, "config.json", local).read_text()).get("architectures")
        return archs if isinstance(archs, list) else None
    except (CheckpointError, OSError, ValueError, AttributeError):
        return None


def _refuse(base: str, model_type: str, archs: list[str] | None):
    found = f"model_type '{model_type}'" + (f" ({', '.join(archs)})" if archs else "")
    hint = "; it is already converted" if model_type == "mlkv_gpt_neox" else ""
    raise CheckpointError(f"{base}: {found} is not supported{hint}; supported: {SUPPORTED}")


def _tokenizer_source(base: str, local: bool, tmp: Path | None) -> Path | None:
    """A folder holding the base's tokenizer files: the base folder itself, or for hub names the
    files fetched into `tmp`. None (not an error) when the base has none.

    Hub files are copied as they are rather than re-saved through AutoTokenizer: transformers 5
    builds an empty GPT-NeoX tokenizer for a repository without tokenizer files, which would be
    written out as if it were the base's.
    """
    if local:
        folder = Path(base).expanduser()
        return folder if any((folder / n).is_file() for n in TOKENIZER_FILES) else None
    found = []
    for name in TOKENIZER_FILES:
        try:
            path = _resolve(base, name, local=False)
        except CheckpointError:  # a tokenizer that cannot be fetched does not stop the conversion
            path = None
        if path is not None:
            shutil.copy2(path, tmp / name)
            found.append(name)
    return tmp if found else None


@dataclass
class BaseCheckpoint:
    """A GPT-NeoX base resolved once for one or more conversions: its transformers config, the
    `MLKVConfig` read from it, its weight files and where its tokenizer files are.

    Open with `BaseCheckpoint.open(name_or_folder)` (a context manager: closing removes the
    temporary folder of a tokenizer fetched from the hub).
    """

    name: str
    hf_config: object
    config: MLKVConfig
    files: list[Path]
    local: bool
    tokenizer_dir: Path | None = None
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @classmethod
    def open(cls, base: str | os.PathLike) -> BaseCheckpoint:
        name = str(base)
        local = _looks_local(name)
        hf_config = load_base_config(name, local)
        try:
            config = MLKVConfig.from_hf(hf_config)
        except ConfigError as e:
            raise ConfigError(f"{name}: {e}") from None
        files = weight_files(name, local)
        tmp = None if local else tempfile.TemporaryDirectory(prefix="mlkv-tokenizer-")
        tokenizer = _tokenizer_source(name, local, Path(tmp.name) if tmp else None)
        return cls(name, hf_config, config, files, local, tokenizer, tmp)

    @property
    def path(self) -> Path | None:
        return Path(self.name).expanduser().resolve() if self.local else None

    def hf_kwargs(self) -> dict:
        """Config attributes of the base kept in the converted config (special token ids)."""
        return special_token_ids(self.hf_config)

    @contextmanager
    def tensors(self) -> Iterator[WeightReader]:
        reader = WeightReader(self.files)
        try:
            yield reader
        finally:
            reader.close()

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> BaseCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextmanager
def _opened(base) -> Iterator[BaseCheckpoint]:
    """`base` as a BaseCheckpoint: opened (and closed) here unless the caller passed one."""
    if isinstance(base, BaseCheckpoint):
        yield base
        return
    with BaseCheckpoint.open(base) as ckpt:
        yield ckpt


def _weights_prefix(reader: WeightReader) -> str:
    """'gpt_neox.' for GPTNeoXForCausalLM checkpoints, '' for a bare GPTNeoXModel."""
    for prefix in ("gpt_neox.", ""):
        if f"{prefix}embed_in.weight" in reader:
            return prefix
    raise CheckpointError(
        f"{reader.files[0].parent}: no GPT-NeoX weights (gpt_neox.embed_in.weight) in "
        f"{', '.join(f.name for f in reader.files)}"
    )


# --------------------------------------------------------------------------------------------
# Converting checkpoints: one layout, the paper's eight, the report
# --------------------------------------------------------------------------------------------


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'float32'/'fp32', 'float16'/'fp16', 'bfloat16'/'bf16' or a torch dtype; None keeps the base's."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype '{dtype}' is not supported; allowed: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_owner_map(text: str | list[int] | tuple[int, ...] | None) -> list[int] | None:
    """'0,0,2,2' (commas or spaces) -> [0, 0, 2, 2]; the layout itself is validated later."""
    if text is None or isinstance(text, (list, tuple)):
        return None if text is None else [int(o) for o in text]
    items = text.replace(",", " ").split()
    if not items or not all(s.isdigit() for s in items):
        raise ConfigError(f"kv owner map '{text}': expected one layer index per layer, e.g. 0,0,2,2")
    return [int(s) for s in items]


def _count_parameters(sd: dict) -> int:
    """Parameters of a converted state dict, a tied output head counted once."""
    seen, total = set(), 0
    for t in sd.values():
        key = (t.data_ptr(), tuple(t.shape)) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel()
    return total


def conversion_report(
    base: MLKVConfig,
    target: MLKVConfig,
    *,
    base_name: str = "",
    out: str = "",
    merge: str = "mean",
    mlp_init: str = "zero",
    match_params: bool = True,
    base_dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype = torch.float32,
) -> dict:
    """What a conversion changes: layout, owner map, parameters, MLP width, KV heads and KV cache
    bytes per token (fp16 and the checkpoints' dtypes), before and after."""
    dtypes = list(dict.fromkeys(["float16", _dtype_name(base_dtype), _dtype_name(out_dtype)]))
    before, after = base.layout, target.layout
    return {
        "base": base_name,
        "out": out,
        "layout": after.name,
        "base_layout": before.name,
        "num_layers": target.num_layers,
        "num_heads": target.num_heads,
        "kv_layers": after.kv_layers,
        "kv_groups": after.num_kv_heads,
        "kv_owner": list(after.kv_owner),
        "owners": list(after.owners),
        "uniform": after.is_uniform,
        "merge": merge,
        "mlp_init": mlp_init,
        "match_params": match_params,
        "dtype": {"before": _dtype_name(base_dtype), "after": _dtype_name(out_dtype)},
        "parameters": {"before": base.num_parameters(), "after": target.num_parameters()},
        "intermediate_size": {"before": base.intermediate_size, "after": target.intermediate_size},
        "kv_heads": {"before": before.kv_heads_total(), "after": after.kv_heads_total()},
        "kv_bytes_per_token": {
            dt: {
                "before": before.kv_bytes_per_token(base.head_dim, dt),
                "after": after.kv_bytes_per_token(target.head_dim, dt),
            }
            for dt in dtypes
        },
    }


def format_report(report: dict) -> str:
    """A conversion report as a short header and a markdown table (before / after / ratio)."""
    owners = report["kv_owner"]
    lines = [
        f"{report['base']} -> {report['out']}",
        f"layout {report['base_layout']} -> {report['layout']} (m = {report['kv_layers']}, "
        f"g = {report['kv_groups']}), owner map {','.join(map(str, owners))}",
        f"merge {report['merge']}, mlp init {report['mlp_init']}, match params {report['match_params']}"
        if report.get("init", "converted") == "converted"
        else f"weights {report['init']} (the base's are not used), match params {report['match_params']}",
        "",
        "| | before | after | after / before |",
        "|---|---|---|---|",
    ]
    rows = [
        ("parameters", report["parameters"]),
        ("MLP intermediate size", report["intermediate_size"]),
        ("KV heads per token", report["kv_heads"]),
    ]
    rows += [(f"KV bytes per token ({dt})", v) for dt, v in report["kv_bytes_per_token"].items()]
    for label, v in rows:
        lines.append(f"| {label} | {v['before']:,} | {v['after']:,} | {v['after'] / v['before']:.6g} |")
    lines.append(f"| dtype | {report['dtype']['before']} | {report['dtype']['after']} | |")
    return "\n".join(lines)


def _write_folder(
    sd: dict,
    target: MLKVConfig,
    out: Path,
    ckpt: BaseCheckpoint,
    dtype: torch.dtype,
    max_shard_size: str,
    report: dict,
    overwrite: bool,
) -> None:
    """Export `sd` and the report into a hidden sibling of `out`, then rename it to `out`: the
    folder is either complete (report included) or absent."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.convert-", dir=out.parent))
    try:
        folder = export_pretrained(
            sd,
            target,
            stage / out.name,
            tokenizer_from=ckpt.tokenizer_dir,
            max_shard_size=max_shard_size,
            dtype=dtype,
            hf_kwargs=ckpt.hf_kwargs(),
        )
        sd.clear()  # export is written: drop the converted tensors before the next step
        report["tokenizer_files"] = sorted(n for n in TOKENIZER_FILES if (folder / n).is_file())
        (folder / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        # mkdtemp makes the folder private (0700); give it the mode a plain mkdir would (umask)
        probe = stage / "mode-probe"
        probe.mkdir()
        folder.chmod(probe.stat().st_mode & 0o777)
        if out.exists() or out.is_symlink():
            if not overwrite:
                raise CheckpointError(f"{out} already exists; pass --overwrite to replace it")
            shutil.rmtree(out) if out.is_dir() and not out.is_symlink() else out.unlink()
        os.replace(folder, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _check_out(out: Path, ckpt: BaseCheckpoint, overwrite: bool) -> None:
    if ckpt.path is not None and out.expanduser().resolve() == ckpt.path:
        raise CheckpointError(f"{out} is the base folder; choose another output folder")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise CheckpointError(f"{out} already exists; pass --overwrite to replace it")


def convert_checkpoint(
    base: str | os.PathLike | BaseCheckpoint,
    out: str | os.PathLike,
    kv_layers: int | None = None,
    kv_groups: int | None = None,
    kv_owner: list[int] | str | None = None,
    merge: str = "mean",
    mlp_init: str = "zero",
    match_params: bool = True,
    overwrite: bool = False,
    dtype: str | torch.dtype | None = None,
    max_shard_size: str = "2GB",
    report_path: str | os.PathLike | None = None,
    progress: bool = True,
    random_init: bool = False,
    seed: int = 0,
) -> dict:
    """Convert a GPT-NeoX checkpoint (hub name or local folder) into a transformers folder `out`.

    Layout: `kv_layers` (m) owner layers with `kv_groups` (g) KV heads each, at the paper's uniform
    positions, or an explicit `kv_owner` map (list or '0,0,2,2'); unset values keep the base's (MHA).
    `merge`: 'mean' or 'sequential' (the reference code); `mlp_init`: 'zero' (function-preserving)
    or 'copy' (the reference code); `match_params=False` keeps the base's MLP width; `dtype` defaults
    to the base's. The base is read one tensor at a time (peak memory about the converted model plus
    one base layer, plus transformers' saving buffers). Writes `out/conversion_report.json` (and
    `report_path` if given) and returns the report. Raises ConfigError for an invalid layout or
    option and CheckpointError for an unreadable base or an existing `out` without `overwrite`.
    `random_init`: the same layout and parameter count with GPT-NeoX's initialisation (`seed`) instead
    of the base's weights, the train-from-scratch baseline that uptraining is measured against.
    """
    for value, allowed, what in ((merge, MERGE_MODES, "merge"), (mlp_init, MLP_INITS, "mlp_init")):
        if value not in allowed:
            raise ConfigError(f"{what} = '{value}' is not supported; allowed: {', '.join(allowed)}")
    out, out_dtype = Path(out), resolve_dtype(dtype)
    kv_owner = parse_owner_map(kv_owner)
    with _opened(base) as ckpt:
        _check_out(out, ckpt, overwrite)
        target = target_config(ckpt.config, kv_layers, kv_groups, kv_owner, match_params)
        with ckpt.tensors() as reader:
            prefix = _weights_prefix(reader)
            base_dtype = reader.dtype(f"{prefix}embed_in.weight")
            from tqdm.auto import tqdm

            layers = tqdm(
                range(target.num_layers),
                desc=f"convert to {target.layout.name}",
                unit="layer",
                leave=False,
                disable=not progress,
            )
            if random_init:
                torch.manual_seed(seed)
                sd = MLKVTransformer(target).state_dict()
                sd = {k: v.to(out_dtype or base_dtype) for k, v in sd.items()}
            else:
                sd = convert_tensors(
                    reader.get,
                    ckpt.config,
                    target,
                    merge,
                    mlp_init,
                    prefix,
                    has=reader.__contains__,
                    dtype=out_dtype,
                    layers=layers,
                    release=reader.release,
                )
        counted = _count_parameters(sd)
        if counted != target.num_parameters():  # the converted tensors must build exactly `target`
            raise RuntimeError(f"converted {counted} parameters, config expects {target.num_parameters()}")
        out_dtype = out_dtype or base_dtype
        report = conversion_report(
            ckpt.config,
            target,
            base_name=ckpt.name,
            out=str(out),
            merge=merge,
            mlp_init=mlp_init,
            match_params=match_params,
            base_dtype=base_dtype,
            out_dtype=out_dtype,
        )
        report["weight_files"] = [f.name for f in ckpt.files]
        report["init"] = f"random (seed {seed})" if random_init else "converted"
        _write_folder(sd, target, out, ckpt, out_dtype, max_shard_size, report, overwrite)
    if report_path is not None:
        Path(report_path).write_text(json.dumps(report, indent=2) + "\n")
    return report


def paper_variants(num_layers: int, num_heads: int) -> list[tuple[str, int, int]]:
    """The paper's eight layouts (its Table 2) for l layers and h heads: (folder name, m, g).

    For Pythia-160M (l = h = 12): gqa-48 (12, 4), mlkv-48 (4, 12), mqa-12 (12, 1), mlkv-12 (4, 3),
    mlkv-6 (6, 1), mlkv-4 (4, 1), mlkv-2 (2, 1), mlkv-1 (1, 1). Other shapes get the same roles:
    (l, h/3), (l/3, h), (l, 1), (l/3, 3), (l/2, 1), (l/3, 1), (l/6, 1), (1, 1), named by their KV
    heads; that needs l a multiple of 6 (at least 12) and h a multiple of 3 (at least 6), so that all
    eight exist and differ. Anything else is a ConfigError rather than a guessed approximation.
    """
    if num_layers % 6 or num_layers < 12 or num_heads % 3 or num_heads < 6:
        raise ConfigError(
            f"the paper variants need num_layers a multiple of 6 (at least 12) and num_heads a "
            f"multiple of 3 (at least 6), as Pythia-160M (12, 12); this base has l = {num_layers}, "
            f"h = {num_heads}: convert the layouts you want one at a time with --kv-layers/--kv-groups"
        )
    variants = []
    for _, m_of, g_of in PAPER_LAYOUTS:
        m, g = m_of(num_layers), g_of(num_heads)
        variants.append((KVLayout.uniform(num_layers, num_heads, m, g).name.lower(), m, g))
    return variants


def convert_paper_variants(
    base: str | os.PathLike | BaseCheckpoint,
    out_root: str | os.PathLike,
    merge: str = "mean",
    mlp_init: str = "zero",
    match_params: bool = True,
    overwrite: bool = False,
    dtype: str | torch.dtype | None = None,
    max_shard_size: str = "2GB",
    report_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> list[dict]:
    """Convert `base` into each of `paper_variants(l, h)`, as `out_root/<name>` (e.g. `mlkv-6`).

    The base is resolved once and streamed once per variant. Checks every output folder before
    converting anything; writes `out_root/paper_variants.json` (and `report_path`) with the reports.
    """
    out_root = Path(out_root)
    with _opened(base) as ckpt:
        variants = paper_variants(ckpt.config.num_layers, ckpt.config.num_heads)
        for name, _, _ in variants:
            _check_out(out_root / name, ckpt, overwrite)
        from tqdm.auto import tqdm

        reports = []
        bar = tqdm(variants, desc="paper variants", unit="model", disable=not progress)
        for name, m, g in bar:
            bar.set_postfix_str(name)
            reports.append(
                convert_checkpoint(
                    ckpt,
                    out_root / name,
                    m,
                    g,
                    merge=merge,
                    mlp_init=mlp_init,
                    match_params=match_params,
                    overwrite=overwrite,
                    dtype=dtype,
                    max_shard_size=max_shard_size,
                    progress=False,
                )
            )
    text = json.dumps(reports, indent=2) + "\n"
    (out_root / "paper_variants.json").write_text(text)
    if report_path is not None:
        Path(report_path).write_text(text)
    return reports


def format_variants_table(reports: list[dict]) -> str:
    """One row per converted variant: the paper's Table 2 columns plus the KV cache per token."""
    lines = [
        "| variant | m | g | KV heads | parameters | MLP size | KV bytes/token (fp16) | folder |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if reports:  # the base, for comparison
        r = reports[0]
        lines.append(
            f"| {r['base_layout']} (base) | {r['num_layers']} | {r['num_heads']} | {r['kv_heads']['before']} | "
            f"{r['parameters']['before']:,} | {r['intermediate_size']['before']} | "
            f"{r['kv_bytes_per_token']['float16']['before']:,} | {r['base']} |"
        )
    for r in reports:
        lines.append(
            f"| {r['layout']} | {r['kv_layers']} | {r['kv_groups']} | {r['kv_heads']['after']} | "
            f"{r['parameters']['after']:,} | {r['intermediate_size']['after']} | "
            f"{r['kv_bytes_per_token']['float16']['after']:,} | {r['out']} |"
        )
    return "\n".join(lines)
