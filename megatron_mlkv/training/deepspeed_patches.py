"""Adjustments to DeepSpeed internals, each touching one private name and checked against
DeepSpeed 0.16.6 (the oldest allowed) and 0.19 (the newest tested)."""

from __future__ import annotations

import torch


def no_shared_memory_allreduce() -> None:
    """Keep DeepSpeed's communication backend from building its shared-memory all-reduce op.

    On the CPU, DeepSpeed compiles that op on the first start (about a minute) and maps a 67 MB
    `/dev/shm/deepspeed_allreduce_buffer_*` per rank that it never unlinks: every run leaves them
    behind until /dev/shm fills the machine's memory, and a later run on a reused port maps the stale
    buffers of its peers. Only `inference_all_reduce` (DeepSpeed inference's AutoTP) uses the op;
    training reduces through gloo or NCCL. Call before `deepspeed.init_distributed` or
    `deepspeed.initialize`, whichever comes first; the op list is `deepspeed.ops.__compatible_ops__`."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def float32_grad_norm(optimizer) -> None:
    """Give a DeepSpeed ZeRO-1/2 optimizer a float32 multi-tensor gradient norm (for clipping).

    DeepSpeed converts each gradient to float64 for its norm (`get_grad_norm_direct`): at the
    Pythia-1B size that writes 8 GB and reads 10 GB a step, ~3% of an H100 step. Here the norms are
    one `torch._foreach_norm` over the bf16 gradients, accumulated in float32 (as torch's
    `clip_grad_norm_` and Megatron do). Same reductions across ranks, the same -1 for a non-finite
    norm (masked on the GPU, where DeepSpeed reads it on the host). Other norm types, CPU offload and
    other optimizers keep DeepSpeed's code."""
    from deepspeed import comm as ds_dist
    from deepspeed.runtime.utils import is_model_parallel_parameter
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or optimizer.cpu_offload:
        return
    deepspeed_norm = optimizer.get_grad_norm_direct

    def grad_norm(gradients, params, norm_type=2):
        if float(norm_type) != 2.0:
            return deepspeed_norm(gradients, params, norm_type)
        grads = [
            g.detach()
            for g, p in zip((g for g in gradients if not getattr(g, "_zero_padding", False)), params)
            if not getattr(p, "ds_pipe_replicated", False)
            and (is_model_parallel_parameter(p) or optimizer.model_parallel_rank == 0)
        ]
        if grads:
            total = torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32)).square().sum()
        else:
            total = torch.zeros((), dtype=torch.float32, device=optimizer.device)
        ds_dist.all_reduce(total, op=ds_dist.ReduceOp.SUM, group=optimizer.dp_process_group)
        optimizer._model_parallel_all_reduce(tensor=total, op=ds_dist.ReduceOp.SUM)
        total = total.sqrt()
        return total.masked_fill_(~torch.isfinite(total), -1.0)

    optimizer.get_grad_norm_direct = grad_norm
