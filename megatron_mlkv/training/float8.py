"""Float8 training of the blocks' linear layers (`--fp8`), with torchao's float8 recipes.

`to_float8(model, recipe)` swaps each layer's attention projections and MLP matrices for torchao's
`Float8Linear`: forward and both backward matmuls run in float8 (e4m3; the tensorwise recipe keeps
gradients in e5m2) with dynamic scales, one per tensor (`tensorwise`) or one per row (`rowwise`),
while the weights, the optimizer and every other operation stay as they were (bf16 compute, fp32
master weights). The embedding, the norms and attention itself stay in bf16, and so does the output
layer: the fused loss multiplies by its weight directly, never through the module.

Float8 matmuls need matrix units that do float8: compute capability 8.9 (Ada) or 9.0 (Hopper) and
later. Elsewhere, and with tensor parallelism (its layers are ours, not `nn.Linear`), `--fp8` is
refused in one line before step 1 (`float8_problem`). The parameters keep their names, so checkpoints
and exports are those of a bf16 run; `--fp8` is one of the settings a resume must repeat
(`plan.RESUME_KEYS`).
"""

from __future__ import annotations

from torch import nn

RECIPES = ("tensorwise", "rowwise")
DEFAULT_RECIPE = "tensorwise"
FLOAT8_CAPABILITY = (8, 9)
DIVISOR = 16  # torch._scaled_mm needs both dimensions of each matrix divisible by 16


def float8_problem(recipe: str, tp: int, cuda_capability: tuple[int, int] | None) -> str | None:
    """Why `--fp8 recipe` cannot run here (one line), or None. `cuda_capability`: the GPU's, None
    without one."""
    if recipe not in RECIPES:
        return f"--fp8 {recipe}: unknown recipe; choose {' or '.join(RECIPES)}"
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return "--fp8 needs torchao: pip install -e '.[gpu]' (or pip install torchao)"
    if cuda_capability is None:
        return "--fp8 needs a GPU with float8 matrix units (compute capability 8.9 or later); none is visible"
    if tuple(cuda_capability) < FLOAT8_CAPABILITY:
        major, minor = cuda_capability
        return (
            f"--fp8 needs a GPU with float8 matrix units (compute capability 8.9 or later: Ada, Hopper); "
            f"this one has {major}.{minor}"
        )
    if tp > 1:
        return "--fp8 does not combine with --tp: the tensor-parallel layers are not nn.Linear; train without --tp"
    return None


def float8_config(recipe: str, emulate: bool = False):
    """torchao's `Float8LinearConfig` of a recipe; `emulate` computes the float8 matmuls in float32
    (any device: the tests' CPU runs)."""
    import dataclasses

    from torchao.float8 import Float8LinearConfig

    config = Float8LinearConfig.from_recipe_name(recipe)
    return dataclasses.replace(config, emulate=True) if emulate else config


def float8_modules(model: nn.Module) -> list[str]:
    """The names of the linear layers `to_float8` converts: those inside the blocks whose matrices
    float8 matmuls can take (both dimensions multiples of `DIVISOR`)."""
    return [
        f"layers.{name}"
        for name, module in model.layers.named_modules()
        if isinstance(module, nn.Linear) and all(d % DIVISOR == 0 for d in module.weight.shape)
    ]


def left_in_bf16(model: nn.Module) -> str | None:
    """A line naming the blocks' linear layers `to_float8` leaves in bf16 (a dimension no multiple of
    `DIVISOR`, as the paper's parameter match can give the MLP), or None when it takes them all."""
    converted = set(float8_modules(model))
    shapes = {
        tuple(module.weight.shape)
        for name, module in model.layers.named_modules()
        if isinstance(module, nn.Linear) and f"layers.{name}" not in converted
    }
    if not shapes:
        return None
    listed = ", ".join(f"{o} x {i}" for o, i in sorted(shapes))
    return (
        f"--fp8: the blocks' linear layers of shape {listed} stay in bf16 (float8 matmuls take dimensions that "
        f"are multiples of {DIVISOR}); convert with --mlp-multiple {DIVISOR} (or 64) to train them in float8 too"
    )


def to_float8(model: nn.Module, recipe: str = DEFAULT_RECIPE, emulate: bool = False) -> list[str]:
    """Swap the blocks' linear layers (`float8_modules`) for torchao's `Float8Linear`, in place, before
    the layers are compiled and DeepSpeed wraps the model. Returns the converted names."""
    from torchao.float8 import convert_to_float8_training

    names = set(float8_modules(model))
    convert_to_float8_training(
        model, config=float8_config(recipe, emulate), module_filter_fn=lambda module, fqn: fqn in names
    )
    return sorted(names)
