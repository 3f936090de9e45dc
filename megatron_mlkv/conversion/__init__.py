"""Conversion of GPT-NeoX checkpoints into MLKV layouts. core.py holds the math and the one pass over
the layers, checkpoint_io.py reads base checkpoints (local or hub), convert.py writes converted
folders and their reports, gpt_neox.py maps GPT-NeoX's own layout in both directions."""

from .checkpoint_io import SUPPORTED, WEIGHT_FILES, BaseCheckpoint, WeightReader, load_base_config, weight_files
from .convert import (
    DTYPES,
    PAPER_LAYOUTS,
    REPORT_NAME,
    conversion_report,
    convert_checkpoint,
    convert_paper_variants,
    format_report,
    format_variants_table,
    load_base_model,
    paper_variants,
    parse_owner_map,
    resolve_dtype,
)
from .core import (
    MERGE_MODES,
    MLP_INITS,
    LayerMerger,
    convert_layer,
    convert_state_dict,
    convert_tensors,
    group_heads,
    matched_intermediate_size,
    merge_kv,
    target_config,
    widen_mlp,
)
from .gpt_neox import fuse_qkv, gpt_neox_config, split_qkv, to_gpt_neox

__all__ = [
    "SUPPORTED",
    "WEIGHT_FILES",
    "BaseCheckpoint",
    "WeightReader",
    "load_base_config",
    "weight_files",
    "DTYPES",
    "PAPER_LAYOUTS",
    "REPORT_NAME",
    "convert_checkpoint",
    "convert_paper_variants",
    "conversion_report",
    "format_report",
    "format_variants_table",
    "load_base_model",
    "paper_variants",
    "parse_owner_map",
    "resolve_dtype",
    "MERGE_MODES",
    "MLP_INITS",
    "LayerMerger",
    "convert_layer",
    "convert_state_dict",
    "convert_tensors",
    "group_heads",
    "matched_intermediate_size",
    "merge_kv",
    "target_config",
    "widen_mlp",
    "fuse_qkv",
    "gpt_neox_config",
    "split_qkv",
    "to_gpt_neox",
]
