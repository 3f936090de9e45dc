"""Loading any checkpoint folder into the plain PyTorch model: ours (launch/convert.py, an export)
through transformers, strictly; a base checkpoint (Pythia/GPT-NeoX or the MLKV paper's format;
Llama, Qwen2, Mistral) converted in memory to its own layout. Above both `hf.py` (our folders) and
`conversion/` (the bases)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import MLKVConfig
from .configuration_mlkv import CONFIG_CLASSES
from .conversion import load_base_model
from .conversion.checkpoint_io import MODEL_TYPES as BASE_MODEL_TYPES
from .conversion.reference import is_reference_config, reference_config
from .errors import CheckpointError, MLKVError, first_line
from .model import MLKVTransformer
from .modeling_mlkv import MODEL_CLASSES


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
