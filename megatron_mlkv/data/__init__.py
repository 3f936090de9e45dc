"""Packed-document data. dataset.py is what training reads (`PackedDataset`, `RowSampler`,
`collate`, `Prefetcher`; the file format); sources.py, tokenizer.py and pipeline.py make a pack
(`pack`, behind data_tools/pack_pile.py)."""

from .dataset import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    META_KEYS,
    VERSION,
    DataError,
    PackedDataset,
    Prefetcher,
    RowSampler,
    collate,
    rank_slice,
)
from .pipeline import PACKINGS, format_summary, pack, pack_best_fit, pack_reference
from .sources import DEFAULT_SOURCE, iter_documents, resolve_sources
from .tokenizer import Tokenizer

__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "MAGIC",
    "META_KEYS",
    "VERSION",
    "DataError",
    "PackedDataset",
    "Prefetcher",
    "RowSampler",
    "collate",
    "rank_slice",
    "PACKINGS",
    "format_summary",
    "pack",
    "pack_best_fit",
    "pack_reference",
    "DEFAULT_SOURCE",
    "iter_documents",
    "resolve_sources",
    "Tokenizer",
]
