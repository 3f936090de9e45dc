"""Fixtures shared across test files. Builders that tests call with arguments (tiny configs, GPT-NeoX
oracles, saved checkpoints) are plain functions in helpers.py."""

import pytest

from megatron_mlkv.data.synthetic import write_corpus
from megatron_mlkv.data.tokenizer import train_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer (300 ids, `<|endoftext|>` first) trained locally on the embedded
    corpus: what tests use where a hub tokenizer would be (no network)."""
    root = tmp_path_factory.mktemp("tokenizer")
    return train_tokenizer(write_corpus(root / "corpus.jsonl", 200), root / "tokenizer", vocab_size=300)
