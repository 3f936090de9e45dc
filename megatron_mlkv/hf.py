"""Our transformers-format folders: the one export path for conversion and training, their tokenizer
files, transformers' progress bars. Loading any folder (ours or a base) is `loading.load_pretrained`."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .config import MLKVConfig
from .configuration_mlkv import CONFIG_CLASSES
from .errors import CheckpointError
from .integrity import ordinary_modes
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
PARTIAL = ".tmp-"  # an export is written to `.NAME.tmp-XXXX` beside NAME, then renamed


def special_token_ids(hf_config) -> dict:
    """The special token ids set in a transformers config, to carry into an export's config."""
    return {n: getattr(hf_config, n) for n in SPECIAL_TOKEN_IDS if getattr(hf_config, n, None) is not None}


def output_cache(output):
    """The cache of a transformers model output or `generate` result, under either name it goes by."""
    return getattr(output, CACHE_FIELD)


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


@contextlib.contextmanager
def quiet_transformers():
    """transformers' warnings off within the block: AutoTokenizer on a folder whose config needs
    remote code (an MLKV export) warns that it reads it as a plain config, which it then ignores."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def remove_partial_exports(parent: str | os.PathLike) -> list[Path]:
    """Delete the temporary folders that exports into `parent` left when killed midway; returns them.
    Only while nothing exports into `parent`."""
    removed = [p for p in Path(parent).glob(f".*{PARTIAL}*") if p.is_dir()]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed
