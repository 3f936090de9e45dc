"""Each layer's parameters as two flat tensors, for optimizers that pay per parameter.

DeepSpeed's ZeRO-1/2 does host work for every parameter at every step: a gradient hook, copies into
its reduction buckets, a norm for clipping. A GPT-NeoX layer has 16 parameters (12 with shared K/V),
so at the Pythia-160M size the host, not the GPU, sets the step time. `pack_layers(model)` gives
each layer two parameters instead: `packed_decay` (its weight matrices) and `packed_no_decay` (its
biases and norms' scales and shifts; see `decays`). The layer's modules keep their attributes
(`attention.query.weight`, ...) as views into those two, made again by a forward pre-hook at each
call of the layer, so the model's code and its compiled forward are unchanged (`engine.compile_blocks`
compiles `forward` only, leaving the hook eager). Made there, the views' backward (one concatenation
into the flat gradient) runs as soon as the layer's backward is done, so DeepSpeed's gradient hook
overlaps the next layer's backward. The state dict keeps the original names, so checkpoints load into
packed and unpacked models alike, and so do the names DeepSpeed records for its flat fp32 weights
(`unpacked_checkpoint`), so its `zero_to_fp32.py` writes the model's own parameters.

Every piece starts at a multiple of `ALIGN` elements of its pack: compiled kernels assume 16-byte
aligned inputs, and a view at an odd offset fails on the GPU with a misaligned address. A parameter
whose size is not a multiple of `ALIGN` (the odd MLP width a conversion can give, as its bias) would
shift every piece after it, so it stays a parameter of its own.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch
from torch import nn

from ..model import RMSNorm

PACKS = {True: "packed_decay", False: "packed_no_decay"}
ALIGN = 8  # elements: 16 bytes in bf16/fp16, 32 in fp32


def decays(module: nn.Module, name: str) -> bool:
    """AdamW's weight decay applies to weight matrices and embeddings, not to biases or norms
    (LayerNorm, RMSNorm)."""
    return not (name == "bias" or name == PACKS[False] or isinstance(module, (nn.LayerNorm, RMSNorm)))


def pack_layers(model: nn.Module) -> None:
    """Pack the parameters of each of `model.layers` in place (see the module's docstring)."""
    for block in model.layers:
        groups = {True: [], False: []}
        for path, module in block.named_modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if p.numel() % ALIGN:
                    continue  # left unpacked: it would misalign the pieces after it
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


def pieces(model: nn.Module) -> dict[str, list[tuple[str, torch.Size]]]:
    """{packed parameter's name: [(name, shape) of each parameter in it, in the order they lie in it]}
    over `model`'s modules (empty for an unpacked model)."""
    out = {}
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        for pack, entries in getattr(module, "_packed", {}).items():
            out[prefix + pack] = [(prefix + key, shape) for key, *_, shape in entries]
    return out


def unpack_tensors(model: nn.Module, tensors: dict) -> dict:
    """`tensors` keyed by `model`'s parameter names, each packed one split into its parameters."""
    where = pieces(model)
    out = {}
    for name, tensor in tensors.items():
        if name not in where:
            out[name] = tensor
            continue
        for (key, shape), piece in zip(where[name], tensor.split([shape.numel() for _, shape in where[name]])):
            out[key] = piece.view(shape)
    return out


PADDINGS = "param_alignment_paddings"  # DeepSpeed >= 0.19's per-parameter padding list in its optimizer state


@contextlib.contextmanager
def unpacked_checkpoint(engine):
    """Around `engine.save_checkpoint` and `engine.load_checkpoint`: the checkpoint lists each packed
    parameter as the parameters it holds, under the model's own names, so DeepSpeed's `zero_to_fp32.py`
    cuts its flat fp32 weights into the model's parameters.

    DeepSpeed records, per optimizer parameter, a name and shape (`param_shapes`, in the model states)
    and, from 0.19, an alignment padding (in each optimizer state, checked against the live optimizer's
    on load). A packed parameter's pieces lie back to back in it, so each piece is listed with no
    padding and the last takes the packed parameter's. Loading folds the paddings back; checkpoints
    written before this listing load unchanged."""
    where = pieces(engine.module)
    optimizer = engine.optimizer
    if not where or not hasattr(optimizer, "round_robin_bit16_groups"):  # ZeRO-3 and TP do not pack
        yield
        return
    counts = [
        [len(where.get(engine.param_names[p], [None])) for p in group] for group in optimizer.round_robin_bit16_groups
    ]
    shapes, state_dict, load_state_dict = engine._get_zero_param_shapes, optimizer.state_dict, optimizer.load_state_dict

    def unpacked_shapes():
        return [
            OrderedDict(piece for name, shape in group.items() for piece in where.get(name, [(name, shape)]))
            for group in shapes()
        ]

    def unpacked_state_dict():
        sd = state_dict()
        if PADDINGS in sd:
            sd[PADDINGS] = [
                [q for n, pad in zip(ns, pads) for q in [0] * (n - 1) + [pad]] for ns, pads in zip(counts, sd[PADDINGS])
            ]
        return sd

    def packed_load_state_dict(state_dict_list, *args, **kwargs):
        for sd in state_dict_list:
            if sd is not None and PADDINGS in sd and [len(g) for g in sd[PADDINGS]] == [sum(ns) for ns in counts]:
                ends = [[sum(ns[: i + 1]) - 1 for i in range(len(ns))] for ns in counts]
                sd[PADDINGS] = [[pads[e] for e in es] for es, pads in zip(ends, sd[PADDINGS])]
        return load_state_dict(state_dict_list, *args, **kwargs)

    engine._get_zero_param_shapes = unpacked_shapes
    optimizer.state_dict, optimizer.load_state_dict = unpacked_state_dict, packed_load_state_dict
    try:
        yield
    finally:  # the classes' methods again
        del engine._get_zero_param_shapes, optimizer.state_dict, optimizer.load_state_dict
