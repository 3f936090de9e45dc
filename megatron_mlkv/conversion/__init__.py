"""Conversion of GPT-NeoX and Llama-family checkpoints into MLKV layouts. core.py holds the math and the
one pass over the layers, checkpoint_io.py reads base checkpoints (local or hub), convert.py writes
converted folders and their reports, family.py says what a family's checkpoints look like, and
gpt_neox.py and llama.py map each family's own layout in both directions, and reference.py reads
the MLKV paper's own checkpoints."""

from .checkpoint_io import SUPPORTED, WEIGHT_FILES, BaseCheckpoint, WeightReader, load_base_config, weight_files
from .convert import (
    DTYPES,
    PAPER_LAYOUTS,
    PLAIN,
    REPORT_NAME,
    base_config,
    conversion_report,
    convert_checkpoint,
    convert_paper_variants,
    format_report,
    format_variants_table,
    load_base_model,
    paper_variants,
    parse_owner_map,
    plain_form,
    resolve_dtype,
    to_base_model,
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
    "PLAIN",
    "base_config",
    "plain_form",
    "to_base_model",
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
