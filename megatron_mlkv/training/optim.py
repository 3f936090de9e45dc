"""The paper's optimizer recipe: AdamW parameter groups and the learning-rate schedule (linear
warm-up over 20% of the steps, then cosine decay to a floor)."""

from __future__ import annotations

import math

from torch import nn

from .packing import decays


def lr_factor(step: int, total_steps: int, warmup_ratio: float, min_ratio: float) -> float:
    """Multiplier of the peak lr before optimizer step `step` (0-based): linear warm-up over
    `warmup_ratio` of the run, then cosine decay to `min_ratio`."""
    warmup = int(warmup_ratio * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices and embeddings, none on biases and norms (`decays`)."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:  # a tied output layer is the embedding, once
                continue
            seen.add(id(p))
            (decay if decays(module, name) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
