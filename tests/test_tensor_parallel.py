"""Tensor parallelism on the CPU: gloo ranks (torch.multiprocessing spawn) against a single-process
TP=1 run of the same model and inputs, float32.

Each spawned world runs all its cases inside one set of worker processes (spawning and importing
torch dominate the cost) and writes one JSON of {case: None or traceback} per rank; every pytest
test below then just reads its case. Tolerances: max |TP - TP1| <= 1e-5 · max |TP1| per tensor.

This module deliberately does not import tests/helpers.py: transformers would be imported again in
every spawned process.
"""

from __future__ import annotations

import copy
import json
import os
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import random_mlkv, tiny_config

from megatron_mlkv import parallel as tp
from megatron_mlkv.config import MLKVConfig
from megatron_mlkv.model import MLKVTransformer
from megatron_mlkv.training.deepspeed_patches import float32_grad_norm

RTOL = 1e-5


random_model = random_mlkv  # weights far from uniform attention, identical on every rank for a seed


def batch(config: MLKVConfig, rows: int = 2, seq: int = 9, seed: int = 1, ignore: bool = True):
    """input ids (rows, seq) and next-token targets with a few ignored (-100) positions."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (rows, seq + 1), generator=gen)
    inputs, targets = ids[:, :-1].clone(), ids[:, 1:].clone()
    if ignore:
        targets[0, 2] = targets[-1, -1] = -100
    return inputs, targets


def close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = RTOL, scale: float | None = None):
    """max |actual - expected| <= rtol × scale, scale max |expected| unless given. Gradients pass a
    floor of 1% of the largest gradient: one that sums to nearly nothing keeps the rounding of the
    larger terms it summed (float32 rounding follows their size, not the sum's)."""
    actual, expected = actual.detach().float(), expected.detach().float()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item() if scale is None else scale
    assert err <= rtol * scale + 1e-12, f"{what}: max error {err:.3g} > {rtol} × scale {scale:.3g}"


def reference_step(model: MLKVTransformer, inputs, targets, max_norm: float, lr: float):
    """TP=1: logits, mean loss, gradients (by name), pre-clip norm; then clip and take an SGD step."""
    model.zero_grad(set_to_none=True)
    logits = model(inputs)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    return logits.detach(), loss.detach(), grads, norm


# --------------------------------------------------------------------------------------------------
# Checks run inside the spawned ranks
# --------------------------------------------------------------------------------------------------


def check_against_tp1(
    config: MLKVConfig, tp_group, checkpointing: bool = False, save_merged: str | None = None
) -> None:
    """One TP model vs the TP=1 model: state dicts, logits, losses, gradients, norm, a clipped step.

    save_merged: where TP rank 0 saves the merged state dict (for the export test)."""
    T, rank = tp.group_size(tp_group), tp.group_rank(tp_group)
    ref = random_model(config, seed=7)
    full_sd = {k: v.clone() for k, v in ref.state_dict().items()}
    model = tp.parallelize(copy.deepcopy(ref), tp_group)
    plan = model.tp_plan
    if checkpointing:
        ref.gradient_checkpointing = model.gradient_checkpointing = True
        ref.train(), model.train()
    inputs, targets = batch(config)
    max_norm, lr = 0.5, 0.1
    ref_logits, ref_loss, ref_grads, ref_norm = reference_step(ref, inputs, targets, max_norm, lr)

    # the TP model starts bit-identical: slicing == shard_state_dict, and the merge gives back TP=1
    local_sd = model.state_dict()
    expected_local = tp.shard_state_dict(full_sd, config, rank, T)
    assert local_sd.keys() == expected_local.keys() == full_sd.keys()
    for k in local_sd:
        assert torch.equal(local_sd[k], expected_local[k]), f"{k}: parallelize != shard_state_dict"
    merged = tp.gather_full_state_dict(model, tp_group, dst=None)
    assert merged.keys() == full_sd.keys()
    for k in full_sd:
        assert torch.equal(merged[k], full_sd[k]), f"{k}: export merge is not exact"
    merged_on_0 = tp.gather_full_state_dict(model, tp_group)  # default: TP rank 0 only
    assert (merged_on_0 is None) == (rank != 0)
    if save_merged and rank == 0:
        torch.save(merged_on_0, save_merged)

    # forward: local logits are this rank's vocabulary columns; losses never need full logits
    logits_local = model(inputs)
    assert logits_local.shape[-1] == plan.padded_vocab_size // T
    close(plan.full_logits(logits_local), ref_logits, "logits")
    losses = plan.token_losses(logits_local, targets)
    per_token = F.cross_entropy(ref_logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
    close(losses.flatten(), per_token, "per-token losses")
    assert torch.all(losses[targets == -100] == 0)
    loss = losses.sum() / (targets != -100).sum()
    close(loss, ref_loss, "loss")

    # backward: gradients un-sharded equal TP=1 (replicated KV heads hold the replica-summed gradient)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads.keys() == ref_grads.keys()
    full_grads = tp.gather_full_tensors(grads, config, tp_group, dst=None)
    grad_scale = max(g.abs().max().item() for g in ref_grads.values())
    for n in ref_grads:
        close(full_grads[n], ref_grads[n], f"grad {n}", scale=max(ref_grads[n].abs().max().item(), 1e-2 * grad_scale))
    specs = tp.shard_specs(config, T)
    for n, g in grads.items():  # every copy of a replicated tensor is the same on all its ranks
        copies = [torch.empty_like(g) for _ in range(T)]
        dist.all_gather(copies, g.contiguous(), group=tp_group)
        spec = specs[n]
        holders = (
            range(T)
            if spec.dim is None
            else [r for r in range(T) if spec.shard_index(r, T) == spec.shard_index(rank, T)]
        )
        for r in holders:
            close(copies[r], g, f"grad {n} on TP rank {r} vs {rank}", rtol=1e-6)

    # global norm: every distinct element counted exactly once over the TP group (DeepSpeed's rule)
    counted = torch.tensor([sum(p.numel() for p in model.parameters() if tp.counts_in_grad_norm(p, rank))])
    dist.all_reduce(counted, group=tp_group)
    padding = (plan.padded_vocab_size - config.vocab_size) * config.hidden_size
    padding *= 1 if config.tie_word_embeddings else 2
    mlp_pad = -(-config.intermediate_size // T) * T - config.intermediate_size  # zero-padded MLP units
    per_unit = (3 if config.gated_mlp else 2) * config.hidden_size + config.mlp_bias * (2 if config.gated_mlp else 1)
    padding += config.num_layers * mlp_pad * per_unit  # input weights (and biases), output weight
    assert counted.item() == sum(p.numel() for p in ref.parameters()) + padding, "norm counts a tensor twice"
    close(tp.global_grad_norm(model, tp_group), ref_norm, "global grad norm")

    # a clipped SGD step keeps the TP model equal to the TP=1 model
    norm = tp.clip_grad_norm_(model, max_norm, tp_group)
    assert norm.item() > max_norm, "the test should exercise clipping"
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    merged = tp.gather_full_state_dict(model, tp_group, dst=None)
    for k, v in ref.state_dict().items():
        close(merged[k], v, f"after one step: {k}")
    if plan.padded_vocab_size > config.vocab_size:  # padded rows get no gradient, so stay zero
        assert torch.all(model.embed_out.weight[config.vocab_size - plan.vocab_start :] == 0)


def check_distillation_against_tp1(tp_group) -> None:
    """Distillation with student and teacher sharded by the same plan (the student's K/V head
    replicated, the odd vocabulary padded): the loss, its terms and the student's gradients equal
    TP=1's, for the full-logits and the chunked (several chunks, recomputed) implementations."""
    from megatron_mlkv.training import loss as loss_impls

    loss_impls.DISTILL_CHUNK_ELEMENTS = 5 * 51  # 5 tokens of the 51 local vocabulary columns a chunk
    config = tiny_config(kv_layers=2, num_kv_heads=1)
    ref, ref_teacher = random_model(config, seed=7), random_model(tiny_config(), seed=9).requires_grad_(False)
    inputs, _ = batch(config, rows=3, seq=11)
    labels = inputs.clone()  # position t predicts labels[:, t + 1]
    labels[0, 3] = labels[-1, -1] = -100
    teacher = tp.parallelize(copy.deepcopy(ref_teacher), tp_group)
    for impl in ("logits", "chunked"):
        ref.zero_grad(set_to_none=True)
        want = loss_impls.distill_loss_sums(ref, ref_teacher, inputs, labels, 0.4, 2.0, impl)
        want[0].backward()
        model = tp.parallelize(copy.deepcopy(ref), tp_group)
        got = loss_impls.distill_loss_sums(model, teacher, inputs, labels, 0.4, 2.0, impl)
        for g, w, what in zip(got, want, ("loss", "ce", "kl")):
            close(g, w, f"{impl}: {what}")
        assert want[2].item() > 1.0, "the teacher should differ from the student"
        got[0].backward()
        grads = tp.gather_full_tensors({n: p.grad for n, p in model.named_parameters()}, config, tp_group, dst=None)
        scale = max(p.grad.abs().max().item() for p in ref.parameters())
        for n, p in ref.named_parameters():
            close(grads[n], p.grad, f"{impl}: grad {n}", scale=max(p.grad.abs().max().item(), 1e-2 * scale))
        assert all(p.grad is None for p in teacher.parameters())


def check_standalone_modules(tp_group) -> None:
    """The paths the plan does not use: gathered column output, scattered row input, own input copy."""
    T, rank = tp.group_size(tp_group), tp.group_rank(tp_group)
    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(8, 6), torch.nn.Linear(6, 5)
    x = torch.randn(3, 8, requires_grad=True)
    ref = lin2(torch.tanh(lin1(x)))
    ref.square().sum().backward()
    col = tp.ColumnParallelLinear.from_linear(lin1, tp_group, gather_output=True)
    row = tp.RowParallelLinear.from_linear(lin2, tp_group, input_is_parallel=False)
    xp = x.detach().clone().requires_grad_()
    out = row(torch.tanh(col(xp)))
    close(out, ref, "output")
    out.square().sum().backward()
    close(xp.grad, x.grad, "input grad")
    close(col.weight.grad, lin1.weight.grad.chunk(T)[rank], "column weight grad")
    close(row.weight.grad, lin2.weight.grad.chunk(T, dim=1)[rank], "row weight grad")
    close(row.bias.grad, lin2.bias.grad, "row bias grad")


def check_invalid_plans(tp_group) -> None:
    T = tp.group_size(tp_group)
    for h, g in {2: [(6, 3), (3, 1)], 4: [(12, 3), (6, 2)]}[T]:  # g fits neither way; h % T != 0
        cfg = tiny_config(num_heads=h, hidden_size=96, num_kv_heads=g)
        try:
            tp.TensorParallelPlan(cfg, tp_group)
        except tp.TensorParallelError as e:
            msg = str(e)
            assert f"h = {h}" in msg and f"g = {g}" in msg and f"T = {T}" in msg and "\n" not in msg, msg
        else:
            raise AssertionError(f"(h={h}, g={g}, T={T}) was accepted")


def check_groups(world: int) -> None:
    rank = dist.get_rank()
    for t in (1, 2, world):
        groups = tp.init_groups(t)
        tp_group, dp_group, tp_rank, dp_rank = groups
        k = rank // t
        assert dist.get_process_group_ranks(tp_group) == list(range(k * t, (k + 1) * t))
        assert dist.get_process_group_ranks(dp_group) == list(range(rank % t, world, t))
        assert (tp_rank, dp_rank) == (dist.get_rank(tp_group), dist.get_rank(dp_group)) == (rank % t, k)
        mpu = groups.mpu()
        assert mpu.get_model_parallel_world_size() == mpu.get_tensor_model_parallel_world_size() == t
        assert mpu.get_data_parallel_world_size() == world // t and mpu.get_data_parallel_rank() == k
        assert mpu.get_tensor_model_parallel_src_rank() == k * t
    if world == 4:  # discovery of all TP groups (used to create the KV replica groups everywhere)
        assert tp.plan._all_tp_groups_ranks(tp.init_groups(2).tp_group) == [[0, 1], [2, 3]]
    try:
        tp.init_groups(3)
    except tp.TensorParallelError as e:
        assert "--tp 3" in str(e)
    else:
        raise AssertionError("--tp 3 was accepted for world 4")


def check_float32_grad_norm(optimizer, params: list) -> None:
    """`deepspeed_patches.float32_grad_norm` against DeepSpeed's own (float64) method on the same gradients:
    different on every rank, TP-sharded and replicated parameters, a ZeRO padding tensor, and a
    non-finite gradient (both give -1)."""
    import inspect

    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    assert "get_grad_norm_direct" in vars(optimizer), "float32_grad_norm left DeepSpeed's method in place"
    gen = torch.Generator().manual_seed(dist.get_rank())
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    non_finite = [*grads[:-1], torch.full_like(grads[-1], float("inf"))]
    padding = torch.full((3,), 100.0)  # DeepSpeed's alignment padding: not a gradient, no parameter
    flagged = "_zero_padding" in inspect.getsource(DeepSpeedZeroOptimizer.get_grad_norm_direct)
    if flagged:
        padding._zero_padding = True  # DeepSpeed 0.19.7 on: flagged, also between gradients
    for gradients in (grads, non_finite):
        gradients.insert(1 if flagged else len(gradients), padding)  # before: only after the last parameter
    for gradients, what in ((grads, "finite"), (non_finite, "non-finite")):
        ours = optimizer.get_grad_norm_direct(gradients, params)
        close(ours, DeepSpeedZeroOptimizer.get_grad_norm_direct(optimizer, gradients, params), f"{what} grad norm")
    assert ours.item() == -1.0


def check_deepspeed_tp2_dp2(stage: int, workdir: str) -> None:
    """TP=2 × DP=2 under a real DeepSpeed engine (ZeRO `stage`, gradient clipping, mpu) vs TP=1 on the
    whole batch; then per-TP-rank checkpoints, resume with the same T, export merge."""
    import deepspeed

    groups = tp.init_groups(2)
    config = tiny_config(kv_layers=2, num_kv_heads=1)  # MLKV, one KV head replicated on both TP ranks
    ref = random_model(config, seed=3)
    initial = copy.deepcopy(ref)
    micro = 2 if stage == 1 else 1  # ZeRO-2 also accumulates over 2 micro-batches
    ds_config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 2 // micro,
        "gradient_clipping": 0.5,
        # small buckets: DP reductions interleave with the TP all-reduces inside backward
        "zero_optimization": {
            "stage": stage,
            "overlap_comm": stage == 2,
            "reduce_bucket_size": 2000,
            "allgather_bucket_size": 2000,
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }

    def engine_for(model):
        model = tp.parallelize(model, groups.tp_group)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config, mpu=groups.mpu())
        float32_grad_norm(engine.optimizer)  # as engine.make_engine: the clipping below goes through it
        return engine

    engine = engine_for(copy.deepcopy(ref))
    check_float32_grad_norm(engine.optimizer, list(engine.module.parameters()))
    plan = engine.module.tp_plan
    assert engine.dp_world_size == 2 and engine.mp_world_size == 2 and engine.zero_optimization_stage() == stage
    # ZeRO reduces and partitions over the data-parallel group only
    assert dist.get_process_group_ranks(engine.optimizer.dp_process_group) == dist.get_process_group_ranks(
        groups.dp_group
    )
    # data-parallel ranks read distinct rows, the TP ranks of one DP rank the same rows
    inputs_all, targets_all = batch(config, rows=4, seed=5, ignore=False)
    rows = slice(2 * groups.dp_rank, 2 * groups.dp_rank + 2)
    for step in range(2):
        step_loss = torch.zeros(())
        for m in range(0, 2, micro):  # each DP rank's 2 rows, in micro-batches
            part = slice(rows.start + m, rows.start + m + micro)
            logits = engine(inputs_all[part])
            loss = tp.token_losses(engine, logits, targets_all[part]).mean()
            engine.backward(loss)  # DeepSpeed scales by 1 / gradient_accumulation_steps
            engine.step()  # the optimizer steps at the accumulation boundary only
            step_loss += loss.detach() * micro / 2
        _, ref_loss, _, ref_norm = reference_step(ref, inputs_all, targets_all, max_norm=0.5, lr=0.1)
        dist.all_reduce(step_loss, group=groups.dp_group)
        close(step_loss / 2, ref_loss, f"step {step}: loss")
        assert ref_norm.item() > 0.5, "the test should exercise clipping"
        close(torch.as_tensor(engine.get_global_grad_norm()), ref_norm, f"step {step}: DeepSpeed global grad norm")
    merged = tp.gather_full_state_dict(engine.module, groups.tp_group, dst=None)
    for k, v in ref.state_dict().items():
        close(merged[k], v, f"after 2 DeepSpeed steps: {k}")

    # checkpoints: one model-states file per TP rank, ZeRO states per (DP, TP) rank
    ckpt = os.path.join(workdir, f"ckpt-zero{stage}")
    engine.save_checkpoint(ckpt, tag="step2")
    dist.barrier()
    names = set(os.listdir(os.path.join(ckpt, "step2")))
    assert {"mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"} <= names, names
    assert tp.checkpoint_tp_size(ckpt) == 2
    tp.check_resume_tp(ckpt, 2)
    try:
        tp.check_resume_tp(ckpt, 4)
    except tp.TensorParallelError as e:
        assert "--tp 2" in str(e)
    else:
        raise AssertionError("resuming a T=2 checkpoint with T=4 was accepted")
    resumed = engine_for(copy.deepcopy(initial))
    resumed.load_checkpoint(ckpt, tag="step2")
    for (k, a), b in zip(resumed.module.state_dict().items(), engine.module.state_dict().values()):
        assert torch.equal(a, b), f"resumed {k} differs"
    # one more step on both: optimizer state and data order resume identically
    for e in (engine, resumed):
        for m in range(0, 2, micro):
            part = slice(rows.start + m, rows.start + m + micro)
            e.backward(plan.token_losses(e(inputs_all[part]), targets_all[part]).mean())
            e.step()
    for (k, a), b in zip(resumed.module.state_dict().items(), engine.module.state_dict().values()):
        assert torch.equal(a, b), f"step after resume: {k} differs"


# --------------------------------------------------------------------------------------------------
# Suites: one spawn per world size
# --------------------------------------------------------------------------------------------------

TP2_CASES = {
    "mha_g4_shard": dict(num_kv_heads=4),
    "gqa_g2_shard": dict(num_kv_heads=2),
    "mqa_g1_replicate": dict(num_kv_heads=1),
    "mlkv_m2_g1_replicate": dict(kv_layers=2, num_kv_heads=1),
    "mlkv_nonuniform_owners_g2": dict(kv_owner=(0, 0, 0, 3), num_kv_heads=2),
    "mlkv_nonuniform_owners_g1": dict(kv_owner=(0, 1, 1, 1), num_kv_heads=1),
    "sequential_residual_tied_nobias_g1": dict(
        kv_layers=2, num_kv_heads=1, use_parallel_residual=False, tie_word_embeddings=True, attention_bias=False
    ),
    "gradient_checkpointing_m2_g2": dict(kv_layers=2, num_kv_heads=2, checkpointing=True),
    "vocab_divisible_g1": dict(num_kv_heads=1, vocab_size=128),
    "mlp_width_padded_m2_g1": dict(kv_layers=2, num_kv_heads=1, intermediate_size=97),
    "unrotated_shared_keys_m2_g2": dict(kv_layers=2, num_kv_heads=2, unrotated_shared_keys=True),
    # the Llama family: RMSNorm entering the TP region, gate_proj/up_proj/down_proj, llama3 rope scaling
    "llama_gqa_g2_shard": dict(family="llama", num_kv_heads=2),
    "llama_mlkv_m2_g1_replicate_mlp_padded": dict(family="llama", kv_layers=2, num_kv_heads=1, intermediate_size=97),
    "qwen2_biases_m2_g2_tied": dict(
        family="llama",
        kv_layers=2,
        num_kv_heads=2,
        attention_bias=True,
        attention_out_bias=False,
        mlp_bias=True,
        tie_word_embeddings=True,
    ),
}

TP4_CASES = {
    "t4_g4_shard": dict(num_kv_heads=4),
    "t4_g2_replicate_pairs": dict(num_kv_heads=2),
    "t4_mlkv_m2_g2_replicate_pairs": dict(kv_layers=2, num_kv_heads=2, use_parallel_residual=False),
    "t4_mlkv_m1_g1_replicate_all": dict(kv_layers=1, num_kv_heads=1),
    "t4_llama_mlkv_m2_g2_replicate_pairs": dict(family="llama", kv_layers=2, num_kv_heads=2),
}


def _case_config(changes: dict) -> tuple[MLKVConfig, bool]:
    changes = dict(changes)
    checkpointing = changes.pop("checkpointing", False)
    return tiny_config(**changes), checkpointing


def _tp_case(name: str, changes: dict):
    def run(tp_group, workdir):
        config, checkpointing = _case_config(changes)
        check_against_tp1(config, tp_group, checkpointing, save_merged=os.path.join(workdir, f"{name}.pt"))

    return run


def _suite(name: str) -> dict:
    if name == "tp2":
        cases = {k: _tp_case(k, v) for k, v in TP2_CASES.items()}
        cases["invalid_h_g_T"] = lambda group, workdir: check_invalid_plans(group)
        cases["standalone_modules"] = lambda group, workdir: check_standalone_modules(group)
        cases["distillation"] = lambda group, workdir: check_distillation_against_tp1(group)
        return cases
    if name == "tp4":
        cases = {"groups_layout": lambda group, workdir: check_groups(4)}
        cases.update({k: _tp_case(k, v) for k, v in TP4_CASES.items()})
        cases["invalid_h_g_T_t4"] = lambda group, workdir: check_invalid_plans(group)
        cases["distillation_t4"] = lambda group, workdir: check_distillation_against_tp1(group)
        return cases
    if name == "deepspeed":
        return {
            f"deepspeed_tp2_dp2_zero{s}": (lambda group, workdir, s=s: check_deepspeed_tp2_dp2(s, workdir))
            for s in (1, 2)
        }
    raise KeyError(name)


def _worker(rank: int, world: int, workdir: str, suite: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        DS_ACCELERATOR="cpu",
    )
    dist.init_process_group(
        "gloo", init_method=f"file://{workdir}/store", rank=rank, world_size=world, timeout=timedelta(seconds=180)
    )
    results = {}
    try:
        world_group = dist.new_group(list(range(world)))
        for case, run in _suite(suite).items():
            try:
                run(world_group, workdir)
                results[case] = None
            except Exception:
                results[case] = traceback.format_exc()
            dist.barrier()
    finally:
        Path(workdir, f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


def run_suite(suite: str, world: int, workdir: Path) -> tuple[list[dict], Path]:
    """({case: None or traceback} per rank, the folder the ranks wrote to)."""
    mp.spawn(_worker, args=(world, str(workdir), suite), nprocs=world, join=True)
    return [json.loads(Path(workdir, f"rank{r}.json").read_text()) for r in range(world)], workdir


def assert_case(suite: tuple[list[dict], Path], case: str) -> None:
    errors = [f"rank {r}:\n{res.get(case, 'not run')}" for r, res in enumerate(suite[0]) if res.get(case, "not run")]
    assert not errors, "\n".join(errors)


@pytest.fixture(scope="module")
def tp2_results(tmp_path_factory):
    return run_suite("tp2", 2, tmp_path_factory.mktemp("tp2"))


@pytest.fixture(scope="module")
def tp4_results(tmp_path_factory):
    return run_suite("tp4", 4, tmp_path_factory.mktemp("tp4"))


@pytest.fixture(scope="module")
def deepspeed_results(tmp_path_factory):
    return run_suite("deepspeed", 4, tmp_path_factory.mktemp("deepspeed"))


@pytest.mark.parametrize("case", [*TP2_CASES, "invalid_h_g_T", "standalone_modules", "distillation"])
def test_tp2_matches_tp1(tp2_results, case):
    assert_case(tp2_results, case)


@pytest.mark.parametrize("case", ["mlkv_m2_g1_replicate", "sequential_residual_tied_nobias_g1"])
def test_tp2_export_is_identical_to_tp1_export(tp2_results, tmp_path, case):
    """The merged T=2 state dict, exported, gives byte-identical files to the TP=1 export."""
    from megatron_mlkv.hf import export_pretrained

    assert_case(tp2_results, case)
    config, _ = _case_config(TP2_CASES[case])
    merged = torch.load(tp2_results[1] / f"{case}.pt")
    a = export_pretrained(merged, config, tmp_path / "tp2")
    b = export_pretrained(random_model(config, seed=7).state_dict(), config, tmp_path / "tp1")
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir()) and "config.json" in files
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.slow
@pytest.mark.parametrize("case", ["groups_layout", *TP4_CASES, "invalid_h_g_T_t4", "distillation_t4"])
def test_tp4_matches_tp1(tp4_results, case):
    assert_case(tp4_results, case)


@pytest.mark.slow
@pytest.mark.compat
@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_tp2_dp2_zero(deepspeed_results, stage):
    assert_case(deepspeed_results, f"deepspeed_tp2_dp2_zero{stage}")


# --------------------------------------------------------------------------------------------------
# Single-process tests
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("h,g,t", [(4, 4, 3), (6, 3, 2), (6, 2, 4), (4, 2, 8), (12, 3, 2), (8, 2, 0)])
def test_invalid_h_g_t_rejected_with_one_line_message(h, g, t):
    with pytest.raises(tp.TensorParallelError) as e:
        tp.validate_tp(h, g, t)
    msg = str(e.value)
    assert f"h = {h}" in msg and f"g = {g}" in msg and f"T = {t}" in msg and "\n" not in msg
    assert isinstance(e.value, ValueError)


def test_valid_tp_sizes():
    assert tp.valid_tp_sizes(4, 4) == [1, 2, 4]
    assert tp.valid_tp_sizes(6, 3) == [1, 3, 6]
    assert tp.valid_tp_sizes(16, 2) == [1, 2, 4, 8, 16]
    assert tp.valid_tp_sizes(12, 4, max_tp=8) == [1, 2, 4]
    assert tp.validate_tp(8, 4, 2) == "shard" and tp.validate_tp(8, 2, 4) == "replicate"


@pytest.mark.parametrize("h", [1, 2, 4, 6, 8, 12, 16, 32])
def test_kv_heads_of_rank_are_the_heads_its_queries_use(h):
    for g in [d for d in range(1, h + 1) if h % d == 0]:
        for t in tp.valid_tp_sizes(h, g):
            holders = {}
            for r in range(t):
                used = sorted({i // (h // g) for i in tp.query_heads_of_rank(h, t, r)})
                held = tp.kv_heads_of_rank(h, g, t, r)
                assert held == used, (h, g, t, r)
                for head in held:
                    holders.setdefault(head, []).append(r)
            # sharded: each head on one rank; replicated: on T/g consecutive ranks
            assert sorted(holders) == list(range(g))
            assert all(len(v) == max(1, t // g) for v in holders.values())


def test_replica_groups_ranks():
    # world 8, T = 4, g = 2: KV head 0 on TP ranks {0, 1}, head 1 on {2, 3}, in every TP group
    assert tp.replica_groups_ranks([[0, 1, 2, 3], [4, 5, 6, 7]], 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    # TP groups need not be adjacent: TP-rank order decides
    assert tp.replica_groups_ranks([[0, 2, 4, 6], [1, 3, 5, 7]], 2) == [[0, 2], [4, 6], [1, 3], [5, 7]]
    assert tp.replica_groups_ranks([[0, 1, 2, 3, 4, 5, 6, 7]], 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_padded_vocab_size():
    assert tp.padded_vocab_size(50304, 8) == 50304
    assert tp.padded_vocab_size(101, 2) == 102 and tp.padded_vocab_size(101, 4) == 104
    assert tp.padded_vocab_size(101, 1) == 101


@pytest.mark.parametrize(
    "changes,t",
    [
        (dict(num_kv_heads=1, kv_layers=2), 4),
        (dict(num_kv_heads=2), 4),
        (dict(num_kv_heads=4, tie_word_embeddings=True), 2),
        (dict(num_kv_heads=2, kv_owner=(0, 0, 2, 2), attention_bias=False), 2),
    ],
)
def test_shard_then_merge_is_exact(changes, t):
    config = tiny_config(**changes)
    full = random_model(config).state_dict()
    specs = tp.shard_specs(config, t)
    shards = [tp.shard_state_dict(full, config, r, t) for r in range(t)]
    for k, v in full.items():
        pieces = [s[k] for s in shards]
        if specs[k].dim is not None:
            assert sum(p.shape[specs[k].dim] for p in pieces) >= v.shape[specs[k].dim]
        assert torch.equal(specs[k].merge(pieces, t), v), k


def test_tp1_plan_without_process_groups_is_the_plain_model():
    config = tiny_config(kv_layers=2, num_kv_heads=2)
    ref = random_model(config)
    model = tp.parallelize(copy.deepcopy(ref))
    assert isinstance(model.embed_out, tp.ColumnParallelLinear)
    assert isinstance(model.layers[0].input_layernorm, tp.TPRegionLayerNorm)
    inputs, targets = batch(config)
    ref_logits = ref(inputs)
    logits = model(inputs)
    assert torch.equal(logits, ref_logits)
    losses = model.tp_plan.token_losses(logits, targets)
    expected = F.cross_entropy(ref_logits.flatten(0, 1), targets.flatten(), reduction="none")
    close(losses.flatten(), expected, "losses")
    close(tp.token_losses(model, logits, targets), tp.token_losses(ref, ref_logits, targets), "token_losses")
    losses.sum().backward()
    expected.sum().backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        close(p.grad, q.grad, n)
    close(tp.global_grad_norm(model), torch.nn.utils.get_total_norm([q.grad for q in ref.parameters()]), "norm")
    assert torch.equal(tp.gather_full_state_dict(model)["embed_out.weight"], ref.embed_out.weight)
    with pytest.raises(tp.TensorParallelError, match="already"):
        tp.parallelize(model)


def test_vocab_parallel_cross_entropy_bf16_and_ignore_index():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=gen).bfloat16().requires_grad_()
    targets = torch.randint(0, 11, (3, 5), generator=gen)
    targets[1, 1] = -100
    losses = tp.vocab_parallel_cross_entropy(logits, targets)
    ref_logits = logits.detach().float().requires_grad_()
    expected = F.cross_entropy(ref_logits.flatten(0, 1), targets.flatten(), reduction="none").view(3, 5)
    close(losses, expected, "losses")
    assert losses.dtype == torch.float32 and losses[1, 1] == 0
    (losses * torch.arange(15.0).view(3, 5)).sum().backward()
    (expected * torch.arange(15.0).view(3, 5)).sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    close(logits.grad, ref_logits.grad, "grad", rtol=1e-2)
    assert torch.all(logits.grad[1, 1] == 0)


def test_checkpoint_tp_size(tmp_path):
    assert tp.checkpoint_tp_size(tmp_path) is None
    (tmp_path / "latest").write_text("global_step7")
    (tmp_path / "global_step7").mkdir()
    for name in [
        "mp_rank_00_model_states.pt",
        "mp_rank_01_model_states.pt",
        "mp_rank_02_model_states.pt",
        "mp_rank_03_model_states.pt",
        "zero_pp_rank_0_mp_rank_03_optim_states.pt",
    ]:
        (tmp_path / "global_step7" / name).write_bytes(b"")
    assert tp.checkpoint_tp_size(tmp_path) == 4
    tp.check_resume_tp(tmp_path, 4)
    with pytest.raises(tp.TensorParallelError, match="--tp 4"):
        tp.check_resume_tp(tmp_path, 2)
    tp.check_resume_tp(tmp_path / "missing", 2)  # nothing to resume: fine
