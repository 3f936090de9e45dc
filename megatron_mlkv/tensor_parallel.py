"""Megatron-style tensor parallelism (TP) for `MLKVTransformer`, applied as a plan after the model is built.

The model code knows nothing of parallelism. `parallelize(model, tp_group)` (a `TensorParallelPlan`)
replaces submodules in place by parallel versions sliced from the full ones, so a TP model starts
bit-identical to the TP=1 model it was built from:

    embed_in                      VocabParallelEmbedding   rows (vocabulary) split T ways
    layers.*.input_layernorm      TPRegionLayerNorm        output enters the TP region (bwd all-reduce)
    layers.*.attention.query      ColumnParallelLinear     h/T query heads per rank
    layers.*.attention.key/value  ColumnParallelLinear     g/T KV heads per rank, or 1 head replicated
                                                           on the T/g ranks whose queries use it
    layers.*.attention.dense      RowParallelLinear        fwd all-reduce
    layers.*.post_attention_layernorm  TPRegionLayerNorm
    layers.*.mlp.dense_h_to_4h    ColumnParallelLinear
    layers.*.mlp.dense_4h_to_h    RowParallelLinear
    final_layer_norm              (replicated)
    embed_out                     ColumnParallelLinear     vocabulary split T ways, never gathered:
                                                           use `vocab_parallel_cross_entropy`

Per layer and step that is Megatron's 2 all-reduces of (b, s, d) in the forward (attention and MLP
outputs) and 2 in the backward (attention and MLP inputs), whether or not the layer owns K/V.

Shared KV heads. Query head i uses KV head i // (h/g). Rank r holds query heads [r·h/T, (r+1)·h/T):
  * g % T == 0: the KV heads [r·g/T, (r+1)·g/T) -- exactly the ones its query heads use (sharded);
  * T % g == 0 (g < T: MQA and most MLKV layouts): a KV head cannot be split, so head r // (T/g) is
    *replicated* on the T/g ranks whose query heads use it. Each replica only sees the gradient from
    its own query heads, so the weight's gradient is summed over exactly those ranks (the "replica
    group"). That sum lives in the autograd graph (the weight passes through `copy_to_region` over
    the replica group: forward identity, backward all-reduce), so it happens inside any
    `loss.backward()` / `engine.backward()` before DeepSpeed's own gradient hooks see `.grad`, and
    it survives DeepSpeed replacing `param.data`; nothing has to be called after backward.
  * anything else is a `TensorParallelError` naming h, g and T.
Cross-layer reuse stays rank-local: a non-owner layer attends with its owner's local K/V shard,
which holds exactly the heads its local queries use.

Vocabulary. A vocabulary that T does not divide is padded with zero rows up to a multiple of T
(`padded_vocab_size`). Padded embedding rows are never looked up; padded logits are masked out of
the cross-entropy (their gradients are zero), and the export drops them, so the padding changes
neither the loss nor the checkpoint. Pythia's 50304 is divisible by every power of two up to 128.

Gradient norm. DeepSpeed (runtime/utils.py `clip_grad_norm_`, zero/stage_1_and_2.py
`get_grad_norm_direct`, bf16_optimizer.py) counts a parameter's gradient iff
`is_model_parallel_parameter(p)` (attribute `model_parallel` or `tensor_model_parallel` truthy) or the
rank's tensor-parallel rank is 0, then sums over the model-parallel group. The parallel modules tag:
sharded tensors True on every rank; a replicated KV shard True on the first rank of its replica group
only and False elsewhere (the first replica group's first rank is TP rank 0, which counts it anyway);
fully replicated parameters (layer norms, row-parallel biases) are untagged, so TP rank 0 counts
them. Each distinct value is therefore counted exactly once. `global_grad_norm` implements the same
rule for plain PyTorch loops and logging.

Collectives take their process group explicitly; group None means "no parallelism" (size 1, no
communication), so the same code runs on one process without `torch.distributed`.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import MLKVConfig
from .model import MLKVTransformer


class TensorParallelError(ValueError):
    """An invalid tensor-parallel setup; the message names the offending sizes (h, g, T, ...)."""


# --------------------------------------------------------------------------------------------------
# Process-group helpers
# --------------------------------------------------------------------------------------------------


def group_size(group) -> int:
    """World size of `group`; 1 for None (no parallelism)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    """This process's rank in `group`; 0 for None."""
    return 0 if group is None else dist.get_rank(group)


# --------------------------------------------------------------------------------------------------
# The four region functions (megatron-core mappings), each with its group passed explicitly
# --------------------------------------------------------------------------------------------------


class _CopyToRegion(torch.autograd.Function):
    """Forward identity, backward all-reduce (sum) of the gradient over `group`."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()  # never modify an incoming gradient in place
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromRegion(torch.autograd.Function):
    """Forward all-reduce (sum) over `group`, backward identity."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _split_last(x: torch.Tensor, group) -> torch.Tensor:
    size, rank = group_size(group), group_rank(group)
    if x.shape[-1] % size:
        raise TensorParallelError(f"last dim {x.shape[-1]} is not divisible by the group size T = {size}")
    return x.chunk(size, dim=-1)[rank].contiguous()


def _gather_last(x: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(group_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


class _ScatterToRegion(torch.autograd.Function):
    """Forward: keep this rank's chunk of the last dim; backward: all-gather along the last dim."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group), None


class _GatherFromRegion(torch.autograd.Function):
    """Forward: all-gather along the last dim; backward: keep this rank's chunk."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


def copy_to_region(x: torch.Tensor, group) -> torch.Tensor:
    """Enter a parallel region: identity forward, all-reduce of the gradient backward (any shape)."""
    return x if group_size(group) == 1 else _CopyToRegion.apply(x, group)


def reduce_from_region(x: torch.Tensor, group) -> torch.Tensor:
    """Leave a row-parallel region: all-reduce (sum) forward, identity backward (any shape)."""
    return x if group_size(group) == 1 else _ReduceFromRegion.apply(x, group)


def scatter_to_region(x: torch.Tensor, group) -> torch.Tensor:
    """(..., n) -> (..., n/T), this rank's chunk; backward all-gathers."""
    return x if group_size(group) == 1 else _ScatterToRegion.apply(x, group)


def gather_from_region(x: torch.Tensor, group) -> torch.Tensor:
    """(..., n/T) -> (..., n), the rank-ordered concatenation; backward keeps this rank's chunk."""
    return x if group_size(group) == 1 else _GatherFromRegion.apply(x, group)


# --------------------------------------------------------------------------------------------------
# Validation and sizes
# --------------------------------------------------------------------------------------------------


def validate_tp(num_heads: int, num_kv_heads: int, tp: int) -> str:
    """How T ranks split h query heads and g KV heads: 'shard' (g % T == 0) or 'replicate' (T % g == 0).

    Raises `TensorParallelError` (one line naming h, g and T, and the valid T) otherwise.
    """
    h, g, t = num_heads, num_kv_heads, tp
    if t < 1:
        raise TensorParallelError(f"tensor-parallel size T = {t} must be >= 1 (h = {h}, g = {g})")
    if h % t == 0 and g % t == 0:
        return "shard"
    if h % t == 0 and t % g == 0:
        return "replicate"
    valid = ", ".join(str(v) for v in valid_tp_sizes(h, g))
    if h % t:
        why = f"h = {h} query heads are not divisible by T = {t}"
    else:
        why = (
            f"g = {g} KV heads is neither a multiple of T = {t} (shard KV heads) nor a divisor of it "
            f"(replicate each KV head on T/g ranks)"
        )
    raise TensorParallelError(
        f"tensor parallelism T = {t} is invalid for h = {h}, g = {g}: {why}; valid T for (h = {h}, g = {g}): {valid}"
    )


def valid_tp_sizes(num_heads: int, num_kv_heads: int, max_tp: int | None = None) -> list[int]:
    """All T with h % T == 0 and (g % T == 0 or T % g == 0), up to max_tp (default h)."""
    h, g = num_heads, num_kv_heads
    return [t for t in range(1, (max_tp or h) + 1) if h % t == 0 and (g % t == 0 or t % g == 0)]


def check_tp_config(config: MLKVConfig, tp: int) -> str:
    """`validate_tp` for a model config; returns 'shard' or 'replicate'. Any MLP width works: one
    that T does not divide (conversion matches parameter counts, e.g. 3,093) is zero-padded."""
    return validate_tp(config.num_heads, config.num_kv_heads, tp)


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """The vocabulary rounded up to a multiple of T (unchanged when T divides it)."""
    return -(-vocab_size // tp) * tp


def kv_shards(num_heads: int, num_kv_heads: int, tp: int) -> int:
    """Into how many distinct pieces the K/V projections are cut: T (sharded) or g (replicated)."""
    return tp if validate_tp(num_heads, num_kv_heads, tp) == "shard" else num_kv_heads


def query_heads_of_rank(num_heads: int, tp: int, rank: int) -> list[int]:
    """The query heads of TP rank `rank`: [r·h/T, (r+1)·h/T)."""
    n = num_heads // tp
    return list(range(rank * n, (rank + 1) * n))


def kv_heads_of_rank(num_heads: int, num_kv_heads: int, tp: int, rank: int) -> list[int]:
    """The KV heads TP rank `rank` holds: [r·g/T, (r+1)·g/T) when sharded, [r // (T/g)] when replicated."""
    validate_tp(num_heads, num_kv_heads, tp)
    s = kv_shards(num_heads, num_kv_heads, tp)
    per = num_kv_heads // s
    i = rank * s // tp
    return list(range(i * per, (i + 1) * per))


# --------------------------------------------------------------------------------------------------
# Parameter tags read by DeepSpeed's gradient norm
# --------------------------------------------------------------------------------------------------


def _tag(param: nn.Parameter, counted: bool, partition_dim: int) -> None:
    """Megatron/DeepSpeed attributes: `tensor_model_parallel`/`model_parallel` make every TP rank
    count this tensor in the global gradient norm (summed over the TP group)."""
    param.tensor_model_parallel = counted
    param.model_parallel = counted
    param.partition_dim = partition_dim
    param.partition_stride = 1


def is_tensor_parallel_param(param: torch.Tensor) -> bool:
    """DeepSpeed's `is_model_parallel_parameter` (0.19.8): either attribute truthy."""
    return bool(getattr(param, "model_parallel", False) or getattr(param, "tensor_model_parallel", False))


def counts_in_grad_norm(param: torch.Tensor, tp_rank: int) -> bool:
    """Whether this rank counts `param` in the global gradient norm (DeepSpeed's rule)."""
    return tp_rank == 0 or is_tensor_parallel_param(param)


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
        w = linear.weight
        module = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            group,
            device=w.device,
            dtype=w.dtype,
            **kwargs,
        )
        tp, rank = group_size(group), group_rank(group)
        with torch.no_grad():
            module.weight.copy_(module.spec.local(w, rank, tp))
            if linear.bias is not None:
                module.bias.copy_(module.spec.local(linear.bias, rank, tp))
        module.weight.requires_grad_(w.requires_grad)
        if module.bias is not None:
            module.bias.requires_grad_(linear.bias.requires_grad)
        return module

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
        w = linear.weight
        module = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            group,
            device=w.device,
            dtype=w.dtype,
            **kwargs,
        )
        with torch.no_grad():
            module.weight.copy_(module.spec.local(w, group_rank(group), group_size(group)))
            if linear.bias is not None:
                module.bias.copy_(linear.bias)
        module.weight.requires_grad_(w.requires_grad)
        if module.bias is not None:
            module.bias.requires_grad_(linear.bias.requires_grad)
        return module

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


# --------------------------------------------------------------------------------------------------
# Vocabulary-parallel cross-entropy
# --------------------------------------------------------------------------------------------------


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token CE from vocabulary-sharded logits; only (N,)-sized tensors are all-reduced."""

    @staticmethod
    def forward(ctx, logits, targets, group, vocab_start, vocab_size, ignore_index):
        local_v = logits.shape[-1]
        x = logits.float()
        x = x.clone() if x is logits else x  # float32 input: never modify the caller's logits
        n_valid = local_v if vocab_size is None else max(0, min(local_v, vocab_size - vocab_start))
        if n_valid < local_v:  # padded vocabulary rows: excluded from the softmax
            x[..., n_valid:] = float("-inf")
        x_max = x.max(dim=-1).values
        if group_size(group) > 1:
            dist.all_reduce(x_max, op=dist.ReduceOp.MAX, group=group)
        x.sub_(x_max.unsqueeze(-1))
        ignored = targets == ignore_index
        local_t = targets.long() - vocab_start
        here = (local_t >= 0) & (local_t < n_valid) & ~ignored
        index = local_t.masked_fill(~here, 0).unsqueeze(-1)
        target_logit = x.gather(-1, index).squeeze(-1).masked_fill(~here, 0.0)
        x.exp_()
        stats = torch.stack([x.sum(dim=-1), target_logit])  # (2, ...): one all-reduce for both
        if group_size(group) > 1:
            dist.all_reduce(stats, group=group)
        sum_exp, target_logit = stats[0], stats[1]
        loss = (torch.log(sum_exp) - target_logit).masked_fill(ignored, 0.0)
        x.div_(sum_exp.unsqueeze(-1))  # softmax over the full vocabulary, this rank's columns
        ctx.save_for_backward(x, index, here, ignored)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, index, here, ignored = ctx.saved_tensors
        grad = softmax.scatter_add(-1, index, -here.unsqueeze(-1).to(softmax.dtype))
        grad.mul_(grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None, None, None


def vocab_parallel_cross_entropy(
    logits_local: torch.Tensor,
    targets: torch.Tensor,
    group=None,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Per-token cross-entropy without ever forming full-vocabulary logits.

    logits_local (..., V_local): this rank's vocabulary columns [vocab_start, vocab_start + V_local)
    (any float dtype; computed in float32). targets (...) global token ids, `ignore_index` for
    tokens without a loss (mask with `targets.masked_fill(~mask, -100)`). `vocab_size`: the true
    vocabulary; columns at or beyond it (padding) are excluded. Returns float32 losses (...),
    identical on every rank of `group`, 0 where ignored (gradient 0 there too); reduce them as
    with `F.cross_entropy(..., reduction='none')`. Costs two all-reduces of (...)-sized tensors.
    """
    return _VocabParallelCrossEntropy.apply(logits_local, targets, group, vocab_start, vocab_size, ignore_index)


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------

# module-name pattern -> style (first match wins); anything unmatched stays replicated
MLKV_TP_PLAN: dict[str, str] = {
    "embed_in": "vocab_embedding",
    "layers.*.input_layernorm": "enter_region",  # feeds query/key/value
    "layers.*.post_attention_layernorm": "enter_region",  # feeds mlp.dense_h_to_4h
    "layers.*.attention.query": "colwise",
    "layers.*.attention.key": "colwise_kv",
    "layers.*.attention.value": "colwise_kv",
    "layers.*.attention.dense": "rowwise",
    # MLP width zero-padded to a multiple of T: padded units have zero weights in and out, so
    # gelu(0) = 0 adds nothing, their gradients are exactly 0 and they stay 0 (dropped on export)
    "layers.*.mlp.dense_h_to_4h": "colwise_padded",
    "layers.*.mlp.dense_4h_to_h": "rowwise_padded",
    "embed_out": "vocab_head",
}


def _style(module_name: str) -> str | None:
    for pattern, style in MLKV_TP_PLAN.items():
        if fnmatch.fnmatchcase(module_name, pattern):
            return style
    return None


def shard_specs(config: MLKVConfig, tp: int) -> dict[str, ShardSpec]:
    """For every key of `MLKVTransformer(config).state_dict()`, how TP with T ranks cuts it."""
    check_tp_config(config, tp)
    s_kv = kv_shards(config.num_heads, config.num_kv_heads, tp)
    with torch.device("meta"):
        full = MLKVTransformer(config)
    specs = {}
    for key, tensor in full.state_dict(keep_vars=True).items():
        module_name, _, param = key.rpartition(".")
        style = _style(module_name)
        if style in ("colwise", "colwise_kv", "colwise_padded"):
            specs[key] = _spec(
                tensor.shape[0], 0, s_kv if style == "colwise_kv" else tp, padded=style == "colwise_padded"
            )
        elif style in ("rowwise", "rowwise_padded") and param == "weight":
            specs[key] = _spec(tensor.shape[1], 1, tp, padded=style == "rowwise_padded")
        elif style in ("vocab_embedding", "vocab_head"):
            specs[key] = _spec(tensor.shape[0], 0, tp, padded=True)
        else:
            specs[key] = ShardSpec()
    return specs


def replica_groups_ranks(tp_groups_ranks: list[list[int]], kv_shards: int) -> list[list[int]]:
    """The global ranks of every replica group: within each TP group (global ranks in TP-rank order),
    the T/kv_shards consecutive TP ranks that hold the same KV piece. Every rank must create these
    groups in this order."""
    out = []
    for ranks in tp_groups_ranks:
        t = len(ranks)
        for piece in range(kv_shards):
            out.append([ranks[r] for r in range(t) if r * kv_shards // t == piece])
    return out


def _all_tp_groups_ranks(tp_group) -> list[list[int]]:
    """The global ranks of every TP group in the world (collective over the default group)."""
    mine = dist.get_process_group_ranks(tp_group)
    if len(mine) == dist.get_world_size():
        return [mine]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    groups = sorted({tuple(r) for r in gathered})
    if sorted(r for g in groups for r in g) != list(range(dist.get_world_size())):
        raise TensorParallelError(f"the TP groups {groups} do not partition the world into groups of equal size")
    return [list(g) for g in groups]


class TensorParallelPlan:
    """Tensor parallelism of an `MLKVTransformer` of `config` over `tp_group` (T = its size).

    Construction validates (h, g, T) and, when KV heads are replicated (T % g == 0, 1 < T/g < T),
    creates the replica groups with `dist.new_group` -- a collective over the default group: build
    the plan on every rank, in the same order relative to other group creations. tp_group None
    means T = 1.

    After `apply(model)` (or `parallelize`): `model(input_ids)` returns this rank's vocabulary
    columns of the logits (b, s, V_pad/T); compute the loss with `token_losses`.
    """

    def __init__(self, config: MLKVConfig, tp_group=None):
        self.config, self.group = config, tp_group
        self.tp_size, self.tp_rank = group_size(tp_group), group_rank(tp_group)
        self.kv_mode = check_tp_config(config, self.tp_size)
        self.kv_shards = kv_shards(config.num_heads, config.num_kv_heads, self.tp_size)
        self.padded_vocab_size = padded_vocab_size(config.vocab_size, self.tp_size)
        self.local_vocab_size = self.padded_vocab_size // self.tp_size
        self.vocab_start = self.tp_rank * self.local_vocab_size
        self.replica_group = self._replica_group()

    def _replica_group(self):
        """The T/g ranks that hold the same KV head (None when KV heads are sharded)."""
        t, s = self.tp_size, self.kv_shards
        if s == t:
            return None
        if s == 1:
            return self.group  # one KV head, replicated on the whole TP group
        me, found = dist.get_rank(), None
        for members in replica_groups_ranks(_all_tp_groups_ranks(self.group), s):  # same order everywhere
            pg = dist.new_group(members)
            if me in members:
                found = pg
        return found

    def describe(self) -> str:
        c, t = self.config, self.tp_size
        kv = (
            f"{c.num_kv_heads // t} KV heads/rank (sharded)"
            if self.kv_mode == "shard"
            else f"1 KV head/rank, each replicated on {t // c.num_kv_heads} ranks"
        )
        return (
            f"TP={t}: {c.num_heads // t} query heads/rank, {kv}, MLP {-(-c.intermediate_size // t)}/rank, "
            f"vocabulary {self.local_vocab_size}/rank (padded {c.vocab_size} -> {self.padded_vocab_size})"
        )

    def kv_heads(self, tp_rank: int | None = None) -> list[int]:
        """The KV heads a TP rank holds (default: this rank)."""
        r = self.tp_rank if tp_rank is None else tp_rank
        return kv_heads_of_rank(self.config.num_heads, self.config.num_kv_heads, self.tp_size, r)

    def _build(self, style: str, module: nn.Module) -> nn.Module:
        g = self.group
        if style == "vocab_embedding":
            return VocabParallelEmbedding.from_embedding(module, g)
        if style == "vocab_head":
            return ColumnParallelLinear.from_linear(module, g, pad=True)  # never gathered
        if style == "enter_region":
            return TPRegionLayerNorm.from_layer_norm(module, g)
        if style in ("colwise", "colwise_padded"):  # input entered the region in the preceding LayerNorm
            return ColumnParallelLinear.from_linear(module, g, copy_input=False, pad=style == "colwise_padded")
        if style == "colwise_kv":
            return ColumnParallelLinear.from_linear(
                module, g, num_shards=self.kv_shards, replica_group=self.replica_group, copy_input=False
            )
        if style in ("rowwise", "rowwise_padded"):
            return RowParallelLinear.from_linear(module, g, pad=style == "rowwise_padded")
        raise TensorParallelError(f"unknown tensor-parallel style '{style}'")

    def apply(self, model: MLKVTransformer) -> MLKVTransformer:
        """Replace the submodules of `model` in place (see `MLKV_TP_PLAN`); returns `model`.

        `model` must be the full TP=1 model, identical on every rank of the TP group (same seed or
        same checkpoint): its weights are sliced, not communicated.
        """
        if getattr(model, "tp_plan", None) is not None:
            raise TensorParallelError("the model is already tensor-parallel")
        if model.config.layout != self.config.layout or model.config.vocab_size != self.config.vocab_size:
            raise TensorParallelError("the plan was built for a different config than the model's")
        tied = model.embed_out.weight is model.embed_in.weight
        for name, module in list(model.named_modules()):
            style = _style(name)
            if style is None:
                continue
            expected = {"vocab_embedding": nn.Embedding, "enter_region": nn.LayerNorm}.get(style, nn.Linear)
            if type(module) is not expected:
                raise TensorParallelError(
                    f"{name}: expected a plain {expected.__name__} for style '{style}', got {type(module).__name__}"
                )
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, self._build(style, module))
        if tied:
            model.embed_out.weight = model.embed_in.weight  # same vocabulary rows, same padding
        for name, module in model.named_modules():  # a layer the plan forgot would silently be wrong
            if type(module) in (nn.Linear, nn.Embedding):
                raise TensorParallelError(
                    f"{name} ({type(module).__name__}) is not covered by the tensor-parallel plan MLKV_TP_PLAN"
                )
        model.tp_plan = self
        return model

    # --- loss and logits ---

    def token_losses(self, logits_local: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Per-token CE (float32, targets' shape) from the logits `model(...)` returned on this rank."""
        return vocab_parallel_cross_entropy(
            logits_local, targets, self.group, self.vocab_start, self.config.vocab_size, ignore_index
        )

    def full_logits(self, logits_local: torch.Tensor) -> torch.Tensor:
        """(..., V_pad/T) -> (..., V) on every rank, for evaluation/generation (differentiable)."""
        return gather_from_region(logits_local, self.group)[..., : self.config.vocab_size]

    # --- gradients ---

    def grad_norm(self, model: nn.Module, norm_type: float = 2.0) -> torch.Tensor:
        return global_grad_norm(model, self.group, norm_type)


def token_losses(
    model: nn.Module, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Per-token CE (float32, targets' shape) for the logits `model(...)` returned, parallel or not.

    `model` may be the `MLKVTransformer` or a DeepSpeed engine wrapping it. Vocabulary-parallel when
    the model was parallelized (logits are this rank's columns), `F.cross_entropy` otherwise, so a
    training loop needs no `if tp:` branch.
    """
    plan = getattr(getattr(model, "module", model), "tp_plan", None)
    if plan is not None:
        return plan.token_losses(logits, targets, ignore_index)
    losses = F.cross_entropy(
        logits.flatten(0, -2).float(), targets.flatten(), ignore_index=ignore_index, reduction="none"
    )
    return losses.view(targets.shape)


def parallelize(model: MLKVTransformer, tp_group=None) -> MLKVTransformer:
    """Apply the tensor-parallel plan to `model` in place and return it (`model.tp_plan` is the plan).

    Collective when KV heads are replicated on 1 < T/g < T ranks (new process groups): call on every
    rank. Call before `deepspeed.initialize`, so the optimizer sees the local shards.
    """
    return TensorParallelPlan(model.config, tp_group).apply(model)


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
# Gradient norm and clipping (plain PyTorch loops, logging)
# --------------------------------------------------------------------------------------------------


def global_grad_norm(model: nn.Module, tp_group=None, norm_type: float = 2.0) -> torch.Tensor:
    """The norm of all gradients of the TP=1 model, from a parallelized one (collective over tp_group).

    Same rule as DeepSpeed: count p iff `is_tensor_parallel_param(p)` or TP rank 0, sum over the TP
    group. Assumes full (not ZeRO-partitioned) `.grad`s; under DeepSpeed use
    `engine.get_global_grad_norm()`, which applies this rule to its partitioned gradients.
    """
    rank = group_rank(tp_group)
    grads = [p.grad for p in model.parameters() if p.grad is not None and counts_in_grad_norm(p, rank)]
    device = next((g.device for g in grads), next(model.parameters()).device)
    if norm_type == math.inf:
        total = (
            torch.stack([g.detach().abs().max().float() for g in grads]).max()
            if grads
            else torch.zeros((), device=device)
        )
        if group_size(tp_group) > 1:
            dist.all_reduce(total, op=dist.ReduceOp.MAX, group=tp_group)
        return total
    total = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        total += torch.linalg.vector_norm(g.detach().float(), norm_type) ** norm_type
    if group_size(tp_group) > 1:
        dist.all_reduce(total, group=tp_group)
    return total ** (1.0 / norm_type)


def clip_grad_norm_(model: nn.Module, max_norm: float, tp_group=None, norm_type: float = 2.0) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for a parallelized model: scale all grads by
    min(1, max_norm / (global norm + 1e-6)); returns the global norm (before clipping)."""
    norm = global_grad_norm(model, tp_group, norm_type)
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.detach().mul_(coef.to(p.grad.device, p.grad.dtype))
    return norm


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


__all__ = [
    "TensorParallelError",
    "copy_to_region",
    "reduce_from_region",
    "scatter_to_region",
    "gather_from_region",
    "validate_tp",
    "valid_tp_sizes",
    "check_tp_config",
    "padded_vocab_size",
    "kv_shards",
    "query_heads_of_rank",
    "kv_heads_of_rank",
    "is_tensor_parallel_param",
    "counts_in_grad_norm",
    "ShardSpec",
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "TPRegionLayerNorm",
    "vocab_parallel_cross_entropy",
    "MLKV_TP_PLAN",
    "shard_specs",
    "replica_groups_ranks",
    "TensorParallelPlan",
    "token_losses",
    "parallelize",
    "shard_state_dict",
    "gather_full_tensors",
    "gather_full_state_dict",
    "global_grad_norm",
    "clip_grad_norm_",
    "ParallelGroups",
    "init_groups",
    "ModelParallelUnit",
    "checkpoint_tp_size",
    "check_resume_tp",
]
