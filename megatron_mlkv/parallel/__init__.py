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

Distillation. A teacher is sharded with the same plan, so its logits are split as the student's, and
`vocab_parallel_distillation` computes the KL divergence between them with three all-reduces of a few
numbers per token (the full-vocabulary logits of neither model are ever formed).

Files: mappings.py (the region functions), layers.py (the parallel modules), cross_entropy.py (the
vocabulary-parallel losses),
plan.py (valid sizes, the plan, `parallelize`), styles.py (what each planned module becomes and how
its tensors are cut), grad_norm.py, checkpoint.py (state-dict shard and
merge, the T of a checkpoint), groups.py (process groups, DeepSpeed's mpu).
"""

from .checkpoint import (
    check_resume_tp,
    checkpoint_tp_size,
    gather_full_state_dict,
    gather_full_tensors,
    shard_state_dict,
)
from .cross_entropy import vocab_parallel_cross_entropy, vocab_parallel_distillation
from .grad_norm import clip_grad_norm_, counts_in_grad_norm, global_grad_norm, is_tensor_parallel_param
from .groups import ModelParallelUnit, ParallelGroups, TensorParallelError, group_rank, group_size, init_groups
from .layers import ColumnParallelLinear, RowParallelLinear, ShardSpec, TPRegionLayerNorm, VocabParallelEmbedding
from .mappings import copy_to_region, gather_from_region, reduce_from_region, scatter_to_region
from .plan import (
    MLKV_TP_PLAN,
    TensorParallelPlan,
    check_tp_config,
    kv_heads_of_rank,
    kv_shards,
    padded_vocab_size,
    parallelize,
    query_heads_of_rank,
    replica_groups_ranks,
    shard_specs,
    token_losses,
    valid_tp_sizes,
    validate_tp,
)

__all__ = [
    "group_size",
    "group_rank",
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
    "vocab_parallel_distillation",
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
