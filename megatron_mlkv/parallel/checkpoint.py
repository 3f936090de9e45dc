"""TP checkpoints: shard a TP=1 state dict, merge the shards back (export), and the T a DeepSpeed
checkpoint was written with (resume needs the same T)."""

from __future__ import annotations

import os
import re

import torch
import torch.distributed as dist

from ..config import MLKVConfig
from ..model import MLKVTransformer
from .groups import TensorParallelError, group_rank, group_size
from .layers import ShardSpec
from .plan import shard_specs

# --------------------------------------------------------------------------------------------------
# State dicts: shard a TP=1 state dict, merge the shards back (export)
# --------------------------------------------------------------------------------------------------


def shard_state_dict(full_state_dict: dict, config: MLKVConfig, tp_rank: int, tp: int) -> dict:
    """This TP rank's state dict (loadable into the parallelized model) from a TP=1 state dict."""
    specs = shard_specs(config, tp)
    missing = set(specs) - set(full_state_dict)
    if missing:
        raise TensorParallelError(f"the state dict lacks {sorted(missing)[:3]} (and {max(0, len(missing) - 3)} more)")
    return {k: specs[k].local(v, tp_rank, tp) if k in specs else v for k, v in full_state_dict.items()}


def gather_full_tensors(local: dict, config: MLKVConfig, tp_group=None, dst: int | None = 0) -> dict | None:
    """Merge per-rank tensors keyed like the model's state dict (weights, gradients, ...) into TP=1 ones.

    Collective over `tp_group`. Returns CPU tensors on TP rank `dst` and None elsewhere
    (dst None: on every rank). Replicated tensors are taken from this rank; replicated KV heads
    from the first replica; vocabulary padding is dropped. Keys sharing one tensor (tied
    embeddings) share one merged tensor, as in the TP=1 state dict (so exports dedupe it alike).
    """
    tp, rank = group_size(tp_group), group_rank(tp_group)
    specs = shard_specs(config, tp)
    keep = dst is None or rank == dst
    out, seen = {}, {}
    for key, tensor in local.items():
        alias = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype, tensor.device)
        if alias in seen and tensor.numel():  # same order on every rank: no collective skipped unevenly
            if keep:
                out[key] = out[seen[alias]]
            continue
        seen[alias] = key
        spec = specs.get(key, ShardSpec())
        if spec.dim is None or tp == 1:
            full = spec.merge([tensor] * tp, tp)
        else:
            pieces = [torch.empty_like(tensor) for _ in range(tp)]
            dist.all_gather(pieces, tensor.detach().contiguous(), group=tp_group)
            full = spec.merge(pieces, tp) if keep else None
        if keep:
            out[key] = full.detach().to("cpu", copy=True)
    return out if keep else None


def gather_full_state_dict(model: MLKVTransformer, tp_group=None, dst: int | None = 0) -> dict | None:
    """The exact TP=1 `MLKVTransformer` state dict of a parallelized model, on TP rank `dst`.

    Collective over `tp_group`: call on every TP rank. With DeepSpeed pass `engine.module` (ZeRO 1/2
    keep full parameters on every data-parallel rank). Feed the result to `hf.export_pretrained`.
    """
    return gather_full_tensors(model.state_dict(), model.config, tp_group, dst)


# --------------------------------------------------------------------------------------------------
# DeepSpeed checkpoints: one set of files per TP rank; resume with the same T
# --------------------------------------------------------------------------------------------------

_MP_RANK_FILE = re.compile(r"mp_rank_(\d+)_model_states\.pt$")


def checkpoint_tp_size(load_dir: str | os.PathLike, tag: str | None = None) -> int | None:
    """T of a DeepSpeed checkpoint (the number of `mp_rank_XX_model_states.pt` files of `tag`,
    default the tag in `latest`); None when there is no such checkpoint."""
    load_dir = os.fspath(load_dir)
    if tag is None:
        latest = os.path.join(load_dir, "latest")
        if not os.path.isfile(latest):
            return None
        with open(latest) as f:
            tag = f.read().strip()
    folder = os.path.join(load_dir, tag)
    if not os.path.isdir(folder):
        return None
    ranks = {int(m.group(1)) for name in os.listdir(folder) if (m := _MP_RANK_FILE.search(name))}
    return max(ranks) + 1 if ranks else None


def check_resume_tp(load_dir: str | os.PathLike, tp: int, tag: str | None = None) -> None:
    """Raise `TensorParallelError` when the checkpoint in `load_dir` was written with a T other than `tp`."""
    saved = checkpoint_tp_size(load_dir, tag)
    if saved is not None and saved != tp:
        raise TensorParallelError(
            f"{load_dir} was saved with --tp {saved}; resume with --tp {saved} "
            f"(not {tp}), or export it and start a new run from the export"
        )
