"""Reading and writing transformers-format folders: the one export path for conversion and training."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .config import MLKVConfig
from .configuration_mlkv import CONFIG_CLASSES
from .errors import MLKVError, first_line
from .integrity import ordinary_modes
from .model import MLKVTransformer
from .modeling_mlkv import CACHE_FIELD, MODEL_CLASSES

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
)


SPECIAL_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
BASE_MODEL_TYPES = ("gpt_neox", "llama", "qwen2", "mistral")  # what conversion reads (checkpoint_io.MODEL_TYPES)
PARTIAL = ".tmp-"  # an export is written to `.NAME.tmp-XXXX` beside NAME, then renamed


def special_token_ids(hf_config) -> dict:
    """The special token ids set in a transformers config, to carry into an export's config."""
    return {n: getattr(hf_config, n) for n in SPECIAL_TOKEN_IDS if getattr(hf_config, n, None) is not None}


def output_cache(output):
    """The cache of a transformers model output or `generate` result, under either name it goes by."""
    return getattr(output, CACHE_FIELD)


class CheckpointError(MLKVError):
    """A checkpoint folder that cannot be read or written; the message names the path."""


def copy_tokenizer_files(src: str | os.PathLike | None, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files found in folder `src` (if any) into `dst`; returns their names."""
    if src is None or not Path(src).is_dir():
        return []
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def export_pretrained(
    state_dict: dict,
    config: MLKVConfig,
    out_dir: str | os.PathLike,
    *,
    tokenizer_from: str | os.PathLike | None = None,
    overwrite: bool = False,
    max_shard_size: str = "2GB",
    dtype: torch.dtype | None = None,
    hf_kwargs: dict | None = None,
    progress: bool = True,
) -> Path:
    """Write an `MLKVTransformer` state dict as a transformers folder that loads with
    `AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)` without this package.
    `progress`: transformers' bar of the shards it writes.

    `hf_kwargs` adds config attributes such as the base's `bos_token_id`/`eos_token_id`. Written to
    a temporary sibling and renamed at the end, so `out_dir` is either complete or absent.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    hf_config = CONFIG_CLASSES[config.family].from_model_config(config, **(hf_kwargs or {}))
    with torch.device("meta"):
        model = MODEL_CLASSES[config.family](hf_config)
    state = {
        f"model.{k}": (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in state_dict.items()
    }
    model.load_state_dict(state, strict=True, assign=True)
    if dtype is not None:
        model.config.dtype = dtype
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{PARTIAL}", dir=out.parent))
    try:
        with progress_bars(progress):
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
        copy_tokenizer_files(tokenizer_from, tmp)
        ordinary_modes(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


@contextlib.contextmanager
def progress_bars(on: bool):
    """transformers' progress bars (writing shards, loading weights) on or off within the block."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    (logging.enable_progress_bar if on else logging.disable_progress_bar)()
    try:
        yield
    finally:
        (logging.enable_progress_bar if was else logging.disable_progress_bar)()


def remove_partial_exports(parent: str | os.PathLike) -> list[Path]:
    """Delete the temporary folders that exports into `parent` left when killed midway; returns them.
    Only while nothing exports into `parent`."""
    removed = [p for p in Path(parent).glob(f".*{PARTIAL}*") if p.is_dir()]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def _model_type(path: str | os.PathLike) -> str | None:
    config = Path(path) / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{path}: no config.json; expected a folder written by launch/convert.py")
    try:
        return json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{config}: unreadable ({first_line(e)})") from None


def _unsupported(path, model_type) -> CheckpointError:
    ours = ", ".join(c.model_type for c in CONFIG_CLASSES.values())
    return CheckpointError(
        f"{path}: model_type '{model_type}' is not supported; expected a folder written by launch/convert.py "
        f"({ours}) or a checkpoint of {', '.join(BASE_MODEL_TYPES)}"
    )


def read_config(path: str | os.PathLike) -> tuple[object, MLKVConfig]:
    """(the transformers config, its `MLKVConfig`) of a folder `load_pretrained` reads; CheckpointError
    (one line) for another model type or a config that does not parse."""
    from transformers import AutoConfig

    model_type = _model_type(path)
    ours = {c.model_type: c for c in CONFIG_CLASSES.values()}
    if model_type not in ours and model_type not in BASE_MODEL_TYPES:
        raise _unsupported(path, model_type)
    try:
        hf_config = (ours[model_type] if model_type in ours else AutoConfig).from_pretrained(path)
        if model_type == "gpt_neox":
            from .conversion.reference import is_reference_config, reference_config

            if is_reference_config(hf_config):
                return hf_config, reference_config(hf_config, str(path))
        return hf_config, MLKVConfig.from_hf(hf_config)
    except MLKVError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except Exception as e:  # a damaged config.json, values transformers refuses
        raise CheckpointError(f"{path}: cannot read config.json ({first_line(e)})") from None


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> MLKVTransformer:
    """Load a folder into the plain PyTorch model (for training and benchmarks): ours (launch/convert.py,
    an export), or a base checkpoint (Pythia/GPT-NeoX or the MLKV paper's format; Llama, Qwen2,
    Mistral) converted in memory to its own layout (`conversion.load_base_model`). Strict: another
    model type, or weights that do not all map onto the model, is a CheckpointError naming them."""
    model_type = _model_type(path)
    ours = {c.model_type: family for family, c in CONFIG_CLASSES.items()}
    if model_type in BASE_MODEL_TYPES:
        from .conversion import load_base_model

        return load_base_model(str(path), dtype=dtype).model
    if model_type not in ours:
        raise _unsupported(path, model_type)
    try:
        hf_model, info = MODEL_CLASSES[ours[model_type]].from_pretrained(path, dtype=dtype, output_loading_info=True)
    except Exception as e:  # transformers/safetensors raise many types for a damaged folder
        raise CheckpointError(f"{path}: cannot load the checkpoint ({first_line(e)})") from None
    problems = [  # transformers gives sets or lists of names
        f"{what} {', '.join(sorted(map(str, keys))[:3])}{' ...' if len(keys) > 3 else ''}"
        for what, keys in (("missing", info["missing_keys"]), ("unexpected", info["unexpected_keys"]))
        if keys
    ]
    if problems:
        raise CheckpointError(f"{path}: its weights do not match its config: {'; '.join(problems)}")
    return hf_model.model
