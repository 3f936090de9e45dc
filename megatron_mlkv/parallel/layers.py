"""Parallel modules, each built from an existing full module by slicing its weights, and `ShardSpec`:
how one tensor is cut (shared by the modules, `checkpoint.shard_state_dict` and the export merge)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..model import RMSNorm
from .grad_norm import _tag
from .groups import TensorParallelError, group_rank, group_size
from .mappings import copy_to_region, gather_from_region, reduce_from_region, scatter_to_region

# --------------------------------------------------------------------------------------------------
# Sharding of one tensor (shared by the modules, `shard_state_dict` and the export merge)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardSpec:
    """How one TP=1 tensor is cut: along `dim` into `num_shards` equal pieces after zero-padding
    `full_size` to `padded_size`; TP rank r holds piece r·num_shards // T. `dim` None: replicated.

    num_shards == T: sharded; num_shards < T (replicated KV heads): each piece lives on T/num_shards
    consecutive ranks.
    """

    dim: int | None = None
    num_shards: int = 1
    full_size: int = 0
    padded_size: int = 0

    def shard_index(self, tp_rank: int, tp: int) -> int:
        return tp_rank * self.num_shards // tp

    def local(self, full: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
        """This rank's piece of the TP=1 tensor `full` (a new contiguous tensor)."""
        if self.dim is None:
            return full.detach().clone()
        full = full.detach()
        if self.padded_size > full.shape[self.dim]:
            pad_shape = list(full.shape)
            pad_shape[self.dim] = self.padded_size - full.shape[self.dim]
            full = torch.cat([full, full.new_zeros(pad_shape)], dim=self.dim)
        n = self.padded_size // self.num_shards
        return full.narrow(self.dim, self.shard_index(tp_rank, tp) * n, n).contiguous().clone()

    def merge(self, pieces: list[torch.Tensor], tp: int) -> torch.Tensor:
        """The TP=1 tensor from the pieces of TP ranks 0..T-1 (one replica of each, padding dropped)."""
        if self.dim is None:
            return pieces[0]
        first = [pieces[r] for r in range(tp) if r % (tp // self.num_shards) == 0]
        return torch.cat(first, dim=self.dim).narrow(self.dim, 0, self.full_size)


def _spec(full_size: int, dim: int, num_shards: int, padded: bool = False) -> ShardSpec:
    padded_size = -(-full_size // num_shards) * num_shards if padded else full_size
    if padded_size % num_shards:
        raise TensorParallelError(f"size {full_size} is not divisible into {num_shards} shards")
    return ShardSpec(dim, num_shards, full_size, padded_size)


# --------------------------------------------------------------------------------------------------
# Parallel modules, each built FROM an existing full module by slicing its weights
# --------------------------------------------------------------------------------------------------


def _shaped_like(cls, linear: nn.Linear, group, **kwargs):
    """An uninitialised `cls` (a parallel Linear) of `linear`'s shape, dtype and device."""
    w = linear.weight
    return cls(
        linear.in_features,
        linear.out_features,
        linear.bias is not None,
        group,
        device=w.device,
        dtype=w.dtype,
        **kwargs,
    )


def _copy_from(module: nn.Module, linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None):
    """`module` holding this rank's `weight` and `bias` of `linear`, with `linear`'s requires_grad."""
    with torch.no_grad():
        module.weight.copy_(weight)
        if linear.bias is not None:
            module.bias.copy_(bias)
    module.weight.requires_grad_(linear.weight.requires_grad)
    if module.bias is not None:
        module.bias.requires_grad_(linear.bias.requires_grad)
    return module


class ColumnParallelLinear(nn.Module):
    """y_local = x W_localᵀ + b_local: the output features of a full `nn.Linear(in, out)` cut into
    `num_shards` row blocks (after zero-padding `out` to `padded_out` if `pad`).

    x (..., in) replicated on the TP group -> y (..., padded_out/num_shards), this rank's block
    starting at output feature `out_start`; with `gather_output`, y (..., out) on every rank.

    num_shards == T (default): plain Megatron column parallelism, piece r on rank r.
    num_shards < T: piece r·num_shards // T is *replicated* on the T/num_shards ranks of
    `replica_group` (the whole TP group when num_shards == 1); the weight enters the graph through
    `copy_to_region(weight, replica_group)`, so backward sums its gradient over exactly the replicas.

    copy_input: apply `copy_to_region(x, group)` here (backward all-reduce of x's gradient). The plan
    turns it off when a `TPRegionLayerNorm` already did it for all the linears reading that input.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group=None,
        *,
        num_shards: int | None = None,
        replica_group=None,
        pad: bool = False,
        copy_input: bool = True,
        gather_output: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        tp, rank = group_size(group), group_rank(group)
        num_shards = tp if num_shards is None else num_shards
        if num_shards > tp or tp % num_shards:
            raise TensorParallelError(f"num_shards = {num_shards} must divide the TP size T = {tp}")
        if num_shards < tp and replica_group is None:
            if num_shards != 1:
                raise TensorParallelError(
                    f"num_shards = {num_shards} < T = {tp} needs the replica_group of "
                    f"the {tp // num_shards} ranks sharing a piece"
                )
            replica_group = group
        if num_shards < tp and group_size(replica_group) != tp // num_shards:
            raise TensorParallelError(
                f"replica_group has {group_size(replica_group)} ranks, expected T / num_shards = {tp // num_shards}"
            )
        if gather_output and num_shards != tp:
            raise TensorParallelError("gather_output needs num_shards == T")
        self.spec = _spec(out_features, 0, num_shards, padded=pad)
        self.in_features, self.out_features = in_features, out_features
        self.padded_out_features = self.spec.padded_size
        self.num_shards, self.shard_index = num_shards, self.spec.shard_index(rank, tp)
        self.local_out_features = self.spec.padded_size // num_shards
        self.out_start = self.shard_index * self.local_out_features
        self.group, self.replica_group = group, (replica_group if num_shards < tp else None)
        self.copy_input, self.gather_output = copy_input, gather_output
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(self.local_out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(self.local_out_features, **factory)) if bias else None
        # counted once: on every rank when sharded, on the first rank of each replica group otherwise
        counted = num_shards == tp or rank % (tp // num_shards) == 0
        for p in (self.weight, self.bias):
            if p is not None:
                _tag(p, counted, 0)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group=None, **kwargs) -> ColumnParallelLinear:
        """This rank's block of `linear` (weights copied, same dtype/device and requires_grad)."""
        module = _shaped_like(cls, linear, group, **kwargs)
        local = lambda t: module.spec.local(t, group_rank(group), group_size(group))
        return _copy_from(module, linear, local(linear.weight), None if linear.bias is None else local(linear.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.copy_input:
            x = copy_to_region(x, self.group)
        weight, bias = self.weight, self.bias
        if self.replica_group is not None:
            # Why: each replica's gradient holds only its own query heads' contribution; the true
            # gradient is the sum over the replicas (see the module docstring).
            weight = copy_to_region(weight, self.replica_group)
            bias = None if bias is None else copy_to_region(bias, self.replica_group)
        y = F.linear(x, weight, bias)
        if self.gather_output:
            y = gather_from_region(y, self.group)[..., : self.out_features]
        return y

    def extra_repr(self) -> str:
        rep = "" if self.replica_group is None else f", replicated on {group_size(self.replica_group)} ranks"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"local=[{self.out_start}:{self.out_start + self.local_out_features}] of "
            f"{self.padded_out_features}, shard {self.shard_index}/{self.num_shards}{rep}, "
            f"bias={self.bias is not None}"
        )


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local W_localᵀ) + b: the input features of a full `nn.Linear(in, out)` cut T ways.

    x (..., in/T), this rank's block of input features (`input_is_parallel`, the output of a
    column-parallel layer), or x (..., in) replicated (then scattered) -> y (..., out) replicated.
    The bias is replicated and added once, after the all-reduce.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group=None,
        *,
        input_is_parallel: bool = True,
        pad: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        tp = group_size(group)
        self.spec = _spec(in_features, 1, tp, padded=pad)
        self.in_features, self.out_features = in_features, out_features
        self.local_in_features = self.spec.padded_size // tp
        self.group, self.input_is_parallel = group, input_is_parallel
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(out_features, self.local_in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        _tag(self.weight, True, 1)  # the bias stays untagged: replicated, counted on TP rank 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, group=None, **kwargs) -> RowParallelLinear:
        """This rank's columns of `linear`'s weight, its whole bias (copied, as `ColumnParallelLinear`)."""
        module = _shaped_like(cls, linear, group, **kwargs)
        weight = module.spec.local(linear.weight, group_rank(group), group_size(group))
        return _copy_from(module, linear, weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_region(x, self.group)
        y = reduce_from_region(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features} (local {self.local_in_features}), "
            f"out_features={self.out_features}, bias={self.bias is not None}"
        )


class VocabParallelEmbedding(nn.Module):
    """The rows of an `nn.Embedding(V, d)` cut T ways (V zero-padded to a multiple of T).

    ids (...) -> (..., d) replicated: each rank looks up the ids in [vocab_start, vocab_end), zeros
    the rest, and the partial embeddings are summed over the group.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, group=None, *, device=None, dtype=None):
        super().__init__()
        tp, rank = group_size(group), group_rank(group)
        self.spec = _spec(num_embeddings, 0, tp, padded=True)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padded_num_embeddings = self.spec.padded_size
        self.local_num_embeddings = self.spec.padded_size // tp
        self.vocab_start = rank * self.local_num_embeddings
        self.vocab_end = self.vocab_start + self.local_num_embeddings
        self.group = group
        self.weight = nn.Parameter(torch.empty(self.local_num_embeddings, embedding_dim, device=device, dtype=dtype))
        _tag(self.weight, True, 0)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, group=None) -> VocabParallelEmbedding:
        w = embedding.weight
        module = cls(embedding.num_embeddings, embedding.embedding_dim, group, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            module.weight.copy_(module.spec.local(w, group_rank(group), group_size(group)))
        module.weight.requires_grad_(w.requires_grad)
        return module

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if group_size(self.group) == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_region(out, self.group)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings} (padded {self.padded_num_embeddings}), {self.embedding_dim}, "
            f"local=[{self.vocab_start}:{self.vocab_end}]"
        )


class TPRegionLayerNorm(nn.LayerNorm):
    """A LayerNorm whose output enters the tensor-parallel region: `copy_to_region(ln(x), group)`.

    Placed on the layer norms that feed column-parallel layers, it does in one all-reduce what each
    of query, key and value would otherwise do separately (Megatron's fused QKV has one too).
    Parameters are the original module's (same objects, same state-dict keys), replicated.
    """

    group = None

    @classmethod
    def from_layer_norm(cls, ln: nn.LayerNorm, group) -> TPRegionLayerNorm:
        module = cls(
            ln.normalized_shape,
            eps=ln.eps,
            elementwise_affine=ln.elementwise_affine,
            bias=ln.bias is not None,
            device="meta",
        )
        module.weight, module.bias = ln.weight, ln.bias
        module.group = group
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return copy_to_region(super().forward(x), self.group)


class TPRegionRMSNorm(RMSNorm):
    """`TPRegionLayerNorm` for the Llama family's RMSNorm: `copy_to_region(norm(x), group)`, the
    parameter the original module's."""

    group = None

    @classmethod
    def from_norm(cls, norm: RMSNorm, group) -> TPRegionRMSNorm:
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.weight, module.eps, module.group = norm.weight, norm.eps, group
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return copy_to_region(super().forward(x), self.group)
