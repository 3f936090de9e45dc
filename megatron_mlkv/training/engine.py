"""The model DeepSpeed wraps (`LossModel`: model plus loss), compiled layers, and `make_engine`."""

from __future__ import annotations

import torch
from torch import nn

from .deepspeed_patches import float32_grad_norm
from .loss import lm_loss_sum
from .optim import lr_factor, param_groups
from .packing import pack_layers


class LossModel(nn.Module):
    """What DeepSpeed wraps: the MLKV model plus its next-token loss, computed inside forward so
    that ZeRO-3 has every weight the loss uses gathered. Returns the float32 sum of token losses.

    `zero3`: the fused and chunked losses use the output layer's weight outside that layer's own
    forward; it is registered as this module's external parameter (DeepSpeed's documented way), so
    ZeRO-3 gathers it for this module's forward and backward."""

    def __init__(self, model: nn.Module, loss_impl: str = "auto", zero3: bool = False):
        super().__init__()
        self.model, self.loss_impl = model, loss_impl
        if zero3 and loss_impl != "logits":
            from deepspeed.runtime.zero.partition_parameters import register_external_parameter

            register_external_parameter(self, model.embed_out.weight)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return lm_loss_sum(self.model, input_ids, labels, self.loss_impl)


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each layer's forward in place: quick to compile, and K/V pass between layers as
    inputs. The layer's own hooks (`packing`'s views, ZeRO-3's gathers) stay outside the compiled
    code; under ZeRO-3, `make_engine` makes each layer one unit so that none of its children has any."""
    for block in model.layers:
        block.forward = torch.compile(block.forward)


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
):
    """`deepspeed.initialize` of `LossModel(model)` with the paper's AdamW and schedule.

    AdamW is torch's fused one on GPUs (DeepSpeed's CPU Adam when the config offloads the
    optimizer). `pack`: hand DeepSpeed two flat parameters per layer (`packing.pack_layers`) under
    ZeRO-0/1/2 without tensor parallelism (ZeRO-3 gathers per module, and TP shards per parameter).

    Under ZeRO-3 each layer is a leaf module (`deepspeed.utils.set_z3_leaf_modules`): its parameters
    are gathered together by the layer's own hooks, and its children (LayerNorm, Linear) get none.
    Hooks on the children would run inside the compiled layer, where dynamo compiles ZeRO-3's
    backward hook once per child until its recompilation limit and the step falls back to eager."""
    import deepspeed

    zero = ds_config.get("zero_optimization", {})
    stage3 = zero.get("stage", 0) == 3
    if pack and not stage3 and mpu is None:
        pack_layers(model)
    if stage3:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, list({type(block) for block in model.layers}))
    wrapped = LossModel(model, loss, zero3=stage3)
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
