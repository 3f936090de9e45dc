"""The model DeepSpeed wraps (`LossModel`: model plus loss), compiled layers, and `make_engine`."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UptrainError
from .deepspeed_patches import float32_grad_norm, no_shared_memory_allreduce
from .distill import Distillation
from .loss import distill_loss_sums, lm_loss_sum
from .optim import lr_factor, param_groups
from .packing import ALIGN, pack_layers


class LossModel(nn.Module):
    """What DeepSpeed wraps: the MLKV model plus its next-token loss, computed inside forward so
    that ZeRO-3 has every weight the loss uses gathered. Returns the float32 sum of token losses;
    `terms` then holds its parts, detached: {"ce": the cross-entropy sum} and, with `distill`,
    {"kl": the sum of KL(teacher || student)} (`loss.distill_loss_sums`).

    `zero3`: the fused and chunked losses use the output layer's weight outside that layer's own
    forward; it is registered as this module's external parameter (DeepSpeed's documented way), so
    ZeRO-3 gathers it for this module's forward and backward.

    `distill`: the teacher is a plain attribute (`Distillation`), not a submodule: DeepSpeed neither
    partitions nor optimises it, and checkpoints do not hold it."""

    def __init__(self, model: nn.Module, loss_impl: str = "auto", zero3: bool = False, distill: Distillation = None):
        super().__init__()
        self.model, self.loss_impl, self.distill = model, loss_impl, distill
        self.terms = {}
        if zero3 and loss_impl != "logits":
            from deepspeed.runtime.zero.partition_parameters import register_external_parameter

            register_external_parameter(self, model.embed_out.weight)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
        """`temperature` overrides the distillation's (validation measures the KL at 1)."""
        if self.distill is None:
            loss = lm_loss_sum(self.model, input_ids, labels, self.loss_impl)
            self.terms = {"ce": loss.detach()}
            return loss
        d = self.distill
        temperature = d.temperature if temperature is None else temperature
        loss, ce, kl = distill_loss_sums(
            self.model, d.teacher, input_ids, labels, d.weight, temperature, self.loss_impl
        )
        self.terms = {"ce": ce, "kl": kl}
        return loss


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each layer's forward in place: quick to compile, and K/V pass between layers as
    inputs. The layer's own hooks (`packing`'s views, ZeRO-3's gathers) stay outside the compiled
    code; under ZeRO-3, `make_engine` makes each layer one unit so that none of its children has any."""
    for block in model.layers:
        block.forward = torch.compile(block.forward)


def deepspeed_pads_parameters() -> bool:
    """Whether this DeepSpeed has ZeRO-1/2's `parameter_alignment` (0.19.7 and later)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    return "parameter_alignment" in DeepSpeedZeroConfig.model_fields


def aligned_zero_config(model: nn.Module, zero: dict) -> dict:
    """`zero` with DeepSpeed's `parameter_alignment` on when ZeRO-1/2 would misalign a parameter.

    ZeRO-1/2 lay all 16-bit parameters back to back in one flat buffer and point each parameter at
    its slice; one whose size is no multiple of 8 (a converted model's widened MLP can be 9,985
    wide) puts every parameter after it at an address that is not 16-byte aligned, and the compiled
    layers' kernels fail on the GPU with "misaligned address". DeepSpeed >= 0.19.7 pads between
    parameters when asked; older versions cannot, which is refused off the CPU."""
    if zero.get("stage", 0) not in (1, 2) or "parameter_alignment" in zero:
        return zero
    odd = next(((n, p.numel()) for n, p in model.named_parameters() if p.numel() % ALIGN), None)
    if odd is None:
        return zero
    if deepspeed_pads_parameters():
        return {**zero, "parameter_alignment": True}
    if next(model.parameters()).device.type != "cpu":  # where the alignment matters
        raise UptrainError(
            f"parameter {odd[0]} has {odd[1]:,} elements, no multiple of {ALIGN}: ZeRO-1/2 would misalign the "
            "parameters after it on the GPU; install deepspeed>=0.19.7 (zero_optimization.parameter_alignment)"
        )
    return zero


def make_engine(
    model: nn.Module,
    ds_config: dict,
    lr: float = 6e-4,
    weight_decay: float = 0.01,
    total_steps: int = 1,
    warmup_ratio: float = 0.2,
    min_lr_ratio: float = 0.1,
    loss: str = "auto",
    mpu=None,
    pack: bool = True,
    distill: Distillation | None = None,
):
    """`deepspeed.initialize` of `LossModel(model)` with the paper's AdamW and schedule.

    AdamW is torch's fused one on GPUs (DeepSpeed's CPU Adam when the config offloads the
    optimizer). `distill`: the teacher and the weights of its loss (`LossModel`). `pack`: hand
    DeepSpeed two flat parameters per layer (`packing.pack_layers`) under ZeRO-0/1/2 without tensor
    parallelism (ZeRO-3 gathers per module, and TP shards per parameter). Under ZeRO-1/2 every
    parameter starts 16-byte aligned (`aligned_zero_config`).

    Under ZeRO-3 each layer is a leaf module (`deepspeed.utils.set_z3_leaf_modules`): its parameters
    are gathered together by the layer's own hooks, and its children (LayerNorm, Linear) get none.
    Hooks on the children would run inside the compiled layer, where dynamo compiles ZeRO-3's
    backward hook once per child until its recompilation limit and the step falls back to eager.
    For the same reason ZeRO-3's `memory_efficient_linear` (a process-wide replacement of
    `F.linear` whose backward reads each weight's ZeRO id, a guard per layer) is turned off."""
    import deepspeed

    no_shared_memory_allreduce()
    zero = ds_config.get("zero_optimization", {})
    stage3 = zero.get("stage", 0) == 3
    if pack and not stage3 and mpu is None:
        pack_layers(model)
    if stage3:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, list({type(block) for block in model.layers}))
        zero = {**zero, "memory_efficient_linear": False}
    else:
        zero = aligned_zero_config(model, zero)
    ds_config = {**ds_config, "zero_optimization": zero}
    wrapped = LossModel(model, loss, zero3=stage3, distill=distill)
    groups = param_groups(wrapped, weight_decay)
    adam = dict(lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    if zero.get("offload_optimizer", {}).get("device") == "cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, adamw_mode=True, **adam)
    else:
        optimizer = torch.optim.AdamW(groups, fused=next(model.parameters()).is_cuda, **adam)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup_ratio, min_lr_ratio)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=wrapped, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, mpu=mpu
    )
    float32_grad_norm(engine.optimizer)
    return engine
