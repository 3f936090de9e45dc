"""Process groups: sizes and ranks of a group (None: one process), the TP x DP groups, and
DeepSpeed's model-parallel unit; `TensorParallelError`."""

from __future__ import annotations

from typing import NamedTuple

import torch.distributed as dist

from ..errors import MLKVError


class TensorParallelError(MLKVError):
    """An invalid tensor-parallel setup; the message names the offending sizes (h, g, T, ...)."""


def group_size(group) -> int:
    """World size of `group`; 1 for None (no parallelism)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    """This process's rank in `group`; 0 for None."""
    return 0 if group is None else dist.get_rank(group)


# --------------------------------------------------------------------------------------------------
# Process groups and the DeepSpeed model-parallel unit
# --------------------------------------------------------------------------------------------------


class ParallelGroups(NamedTuple):
    """TP × DP decomposition of the world; unpacks as (tp_group, dp_group, tp_rank, dp_rank)."""

    tp_group: object
    dp_group: object
    tp_rank: int
    dp_rank: int

    @property
    def tp_size(self) -> int:
        return group_size(self.tp_group)

    @property
    def dp_size(self) -> int:
        return group_size(self.dp_group)

    def mpu(self) -> ModelParallelUnit:
        return ModelParallelUnit(self.tp_group, self.dp_group)


def init_groups(tp: int) -> ParallelGroups:
    """TP and DP groups for world = T × D, TP ranks adjacent: ranks [k·T, (k+1)·T) form TP group k,
    ranks {r, r + T, r + 2T, ...} form DP group r. Collective: call on every rank after
    `dist.init_process_group` (or `deepspeed.init_distributed`). Put T ≤ GPUs per node, so the TP
    all-reduces stay on NVLink.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    if tp < 1 or world % tp:
        raise TensorParallelError(f"--tp {tp} must divide the world size {world} (world = TP × data-parallel)")
    tp_group = dp_group = None
    for k in range(world // tp):
        members = list(range(k * tp, (k + 1) * tp))
        pg = dist.new_group(members)
        if rank in members:
            tp_group = pg
    for r in range(tp):
        members = list(range(r, world, tp))
        pg = dist.new_group(members)
        if rank in members:
            dp_group = pg
    return ParallelGroups(tp_group, dp_group, rank % tp, rank // tp)


class ModelParallelUnit:
    """The "mpu" object `deepspeed.initialize(..., mpu=...)` takes (the methods DeepSpeed 0.19.8 calls).

    With it DeepSpeed reduces gradients and partitions ZeRO 1/2 states over the data-parallel group
    only, sums the gradient norm over the TP group (counting tagged parameters on every rank and the
    rest on TP rank 0), sizes batches by the data-parallel world, and writes `mp_rank_XX` checkpoint
    files per TP rank. It deliberately has no `initialize_sequence_parallel` (DeepSpeed would then
    ignore the model-parallel group) and no sequence-parallel methods.
    """

    def __init__(self, tp_group, dp_group):
        self.tp_group, self.dp_group = tp_group, dp_group

    # model parallel == tensor parallel here (no pipeline parallelism)
    def get_model_parallel_group(self):
        return self.tp_group

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(self.tp_group)

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(self.tp_group)

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        """Global rank of TP rank 0 of this rank's TP group."""
        return dist.get_process_group_ranks(self.tp_group)[0]

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self.dp_group)

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self.dp_group)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.dp_group)

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0
