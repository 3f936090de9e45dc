"""What conversion needs to know of a transformers family: where its checkpoints keep each tensor.

A family's module (gpt_neox.py, llama.py) defines one `Family`; `core.convert_tensors` reads any of
them the same way. Adding a family: a `Family` whose `read_layer` returns one layer's tensors under
`MLKVTransformer`'s names (K and V as heads (g_b, d_k, ...)), the model's parts for it in model.py
(`Block`), and its config in config.py and configuration_mlkv.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import CheckpointError


@dataclass(frozen=True)
class Family:
    """How one family's checkpoints name their tensors.

    `prefixes`: the decoder's prefix in the checkpoint files ("gpt_neox.", "model."), or "" for a bare
    decoder, in the order tried; `embed`, `final_norm`: names after the prefix; `heads`: the output
    layer's names (without prefix) in the order tried; `read_layer(get, base, prefix, i)`: layer i's
    tensors under our names, K and V as (g_b, d_k, ...) heads."""

    name: str
    prefixes: tuple[str, ...]
    embed: str
    final_norm: str
    heads: tuple[str, ...]
    read_layer: Callable


def expect_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """`t`, or a CheckpointError naming the tensor when its shape is not the one the config implies."""
    if tuple(t.shape) != shape:
        raise CheckpointError(f"tensor '{name}' has shape {tuple(t.shape)}, but the config implies {shape}")
    return t
