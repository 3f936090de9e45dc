"""The plan's styles: each says which plain module it takes, builds its parallel version, and cuts
its tensors (`ShardSpec`) the same way, so the modules and the checkpoint shard/merge cannot
disagree."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..model import RMSNorm
from .layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    ShardSpec,
    TPRegionLayerNorm,
    TPRegionRMSNorm,
    VocabParallelEmbedding,
    _spec,
)


@dataclass(frozen=True)
class Style:
    """A module's tensor-parallel treatment. `plan` (a `TensorParallelPlan`) gives the group, T, the
    number of KV shards and the replica group."""

    expects = nn.Linear

    def build(self, module: nn.Module, plan) -> nn.Module:
        raise NotImplementedError

    def spec(self, param: str, tensor: torch.Tensor, tp: int, kv_shards: int) -> ShardSpec:
        return ShardSpec()  # replicated


@dataclass(frozen=True)
class ColumnWise(Style):
    """Y = X A + b with A split along its output dimension (heads, MLP units). The input entered the
    TP region in the preceding LayerNorm. `kv`: key/value, cut into as many shards as there are KV
    heads to split (replicated beyond that); `padded`: the width zero-padded to a multiple of T."""

    kv: bool = False
    padded: bool = False

    def build(self, module, plan):
        if self.kv:
            return ColumnParallelLinear.from_linear(
                module, plan.group, num_shards=plan.kv_shards, replica_group=plan.replica_group, copy_input=False
            )
        return ColumnParallelLinear.from_linear(module, plan.group, copy_input=False, pad=self.padded)

    def spec(self, param, tensor, tp, kv_shards):
        return _spec(tensor.shape[0], 0, kv_shards if self.kv else tp, padded=self.padded)


@dataclass(frozen=True)
class RowWise(Style):
    """Y = X A + b with A split along its input dimension; the outputs are summed (all-reduce). The
    bias is replicated."""

    padded: bool = False

    def build(self, module, plan):
        return RowParallelLinear.from_linear(module, plan.group, pad=self.padded)

    def spec(self, param, tensor, tp, kv_shards):
        return _spec(tensor.shape[1], 1, tp, padded=self.padded) if param == "weight" else ShardSpec()


@dataclass(frozen=True)
class VocabEmbedding(Style):
    """The input embedding, its vocabulary rows split T ways (padded to a multiple of T)."""

    expects = nn.Embedding

    def build(self, module, plan):
        return VocabParallelEmbedding.from_embedding(module, plan.group)

    def spec(self, param, tensor, tp, kv_shards):
        return _spec(tensor.shape[0], 0, tp, padded=True)


@dataclass(frozen=True)
class VocabHead(Style):
    """The output layer, its vocabulary split T ways and never gathered: the loss is
    vocabulary-parallel (`vocab_parallel_cross_entropy`)."""

    def build(self, module, plan):
        return ColumnParallelLinear.from_linear(module, plan.group, pad=True)

    def spec(self, param, tensor, tp, kv_shards):
        return _spec(tensor.shape[0], 0, tp, padded=True)


@dataclass(frozen=True)
class EnterRegion(Style):
    """A norm (LayerNorm, or the Llama family's RMSNorm) whose output enters the TP region (forward
    identity, backward all-reduce); its weights are replicated."""

    expects = (nn.LayerNorm, RMSNorm)

    def build(self, module, plan):
        if isinstance(module, RMSNorm):
            return TPRegionRMSNorm.from_norm(module, plan.group)
        return TPRegionLayerNorm.from_layer_norm(module, plan.group)
