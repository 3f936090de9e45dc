"""Each layer's parameters as two flat tensors, for optimizers that pay per parameter.

DeepSpeed's ZeRO-1/2 does host work for every parameter at every step: a gradient hook, copies into
its reduction buckets, a norm for clipping. A GPT-NeoX layer has 16 parameters (12 with shared K/V),
so at the Pythia-160M size the host, not the GPU, sets the step time. `pack_layers(model)` gives
each layer two parameters instead: `packed_decay` (its weight matrices) and `packed_no_decay` (its
biases and LayerNorm scales and shifts; see `decays`). The layer's modules keep their attributes
(`attention.query.weight`, ...) as views into those two, made again by a forward pre-hook at each
call of the layer, so the model's code and its compiled forward are unchanged (`train.compile_blocks`
compiles `forward` only, leaving the hook eager). Made there, the views' backward (one concatenation
into the flat gradient) runs as soon as the layer's backward is done, so DeepSpeed's gradient hook
overlaps the next layer's backward. The state dict keeps the original names, so checkpoints load into
packed and unpacked models alike.
"""
from __future__ import annotations

import torch
from torch import nn

PACKS = {True: "packed_decay", False: "packed_no_decay"}


def decays(module: nn.Module, name: str) -> bool:
    """AdamW's weight decay applies to weight matrices and embeddings, not to biases or LayerNorm."""
    return not (name == "bias" or name == PACKS[False] or isinstance(module, nn.LayerNorm))


def pack_layers(model: nn.Module) -> None:
    """Pack the parameters of each of `model.layers` in place (see the module's docstring)."""
    for block in model.layers:
        groups = {True: [], False: []}
        for path, module in block.named_modules():
            for name, p in list(module.named_parameters(recurse=False)):
                groups[decays(module, name)].append((f"{path}.{name}".lstrip("."), module, name, p.shape))
        block._packed = {}
        for decay, entries in groups.items():
            if not entries:
                continue
            flat = torch.cat([getattr(m, n).detach().reshape(-1) for _, m, n, _ in entries])
            for _, module, name, _ in entries:
                del module._parameters[name]
            block.register_parameter(PACKS[decay], nn.Parameter(flat))
            block._packed[PACKS[decay]] = entries
        block.register_state_dict_post_hook(_unpack_state)
        block.register_load_state_dict_pre_hook(_pack_state)
        block.register_forward_pre_hook(_refresh_views)
        _refresh_views(block)


def _refresh_views(block: nn.Module, _args=None) -> None:
    """Point the layer's module attributes at the current flat parameters (one split per pack)."""
    for pack, entries in block._packed.items():
        pieces = getattr(block, pack).split([shape.numel() for *_, shape in entries])
        for (_, module, name, shape), piece in zip(entries, pieces):
            setattr(module, name, piece.view(shape))


def _unpack_state(block, state: dict, prefix: str, _metadata) -> None:
    for pack, entries in block._packed.items():
        pieces = state.pop(prefix + pack).split([shape.numel() for *_, shape in entries])
        for (key, *_, shape), piece in zip(entries, pieces):
            state[prefix + key] = piece.view(shape)


def _pack_state(block, state: dict, prefix: str, *_args) -> None:
    for pack, entries in block._packed.items():
        keys = [prefix + key for key, *_ in entries]
        if all(k in state for k in keys):
            state[prefix + pack] = torch.cat([state.pop(k).reshape(-1) for k in keys])
