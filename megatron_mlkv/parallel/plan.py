"""The tensor-parallel plan: which (h, g, T) are valid, how many heads each rank holds, which module
becomes which parallel module, and `parallelize`."""

from __future__ import annotations

import fnmatch

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import MLKVConfig
from ..model import MLKVTransformer
from .cross_entropy import vocab_parallel_cross_entropy
from .grad_norm import global_grad_norm
from .groups import TensorParallelError, group_rank, group_size
from .layers import ShardSpec
from .mappings import gather_from_region
from .styles import ColumnWise, EnterRegion, RowWise, Style, VocabEmbedding, VocabHead

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
# The plan
# --------------------------------------------------------------------------------------------------

# module-name pattern -> style (first match wins); anything unmatched stays replicated
MLKV_TP_PLAN: dict[str, Style] = {
    "embed_in": VocabEmbedding(),
    "layers.*.input_layernorm": EnterRegion(),  # feeds query/key/value
    "layers.*.post_attention_layernorm": EnterRegion(),  # feeds the MLP's first layer(s)
    "layers.*.attention.query": ColumnWise(),
    "layers.*.attention.key": ColumnWise(kv=True),
    "layers.*.attention.value": ColumnWise(kv=True),
    "layers.*.attention.dense": RowWise(),
    # MLP width zero-padded to a multiple of T: padded units have zero weights in and out, so
    # gelu(0) = 0 adds nothing, their gradients are exactly 0 and they stay 0 (dropped on export)
    "layers.*.mlp.dense_h_to_4h": ColumnWise(padded=True),
    "layers.*.mlp.dense_4h_to_h": RowWise(padded=True),
    # the Llama family's gated MLP: gate and up cut alike, so each rank's units are whole
    # (act(0)·0 = 0 for padded units)
    "layers.*.mlp.gate_proj": ColumnWise(padded=True),
    "layers.*.mlp.up_proj": ColumnWise(padded=True),
    "layers.*.mlp.down_proj": RowWise(padded=True),
    "embed_out": VocabHead(),
}


def _style(module_name: str) -> Style | None:
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
        specs[key] = ShardSpec() if style is None else style.spec(param, tensor, tp, s_kv)
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
            expects = style.expects if isinstance(style.expects, tuple) else (style.expects,)
            if type(module) not in expects:
                raise TensorParallelError(
                    f"{name}: expected a plain {' or '.join(e.__name__ for e in expects)} for {style}, "
                    f"got {type(module).__name__}"
                )
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, style.build(module, self))
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
