"""`training.make_engine`: compiled layers under ZeRO-3 train as under ZeRO-2 and are not recompiled
for ZeRO-3's hooks (on a GPU that cost half the step's speed); under ZeRO-1/2 every parameter starts
16-byte aligned, also with an MLP width that is no multiple of 8; a teacher (distillation) trains
alike under ZeRO-2 and ZeRO-3, stays out of DeepSpeed's hands, and with A = 0 changes nothing.

The training runs share one spawned gloo rank, so that its process group and DeepSpeed's state stay
out of the pytest process."""

from __future__ import annotations

import json
import os
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_mlkv.errors import UptrainError

pytestmark = pytest.mark.compat  # DeepSpeed's ZeRO-3 hooks under torch.compile: also run by `make test-compat`

STEPS = 4
MICRO = 2
SEQ = 16


# case: (ZeRO stage, loss, MLP width, distillation weight A or None[, family]); 97 is no multiple of 8,
# as a converted model's widened MLP can be
CASES = {
    "2-chunked": (2, "chunked", 96, None),
    "3-chunked": (3, "chunked", 96, None),
    "3-logits": (3, "logits", 96, None),
    "2-odd": (2, "chunked", 97, None),
    "3-odd": (3, "chunked", 97, None),
    "2-distill-A0": (2, "chunked", 96, 0.0),
    "2-distill": (2, "chunked", 96, 0.5),
    "3-distill": (3, "chunked", 96, 0.5),
    # the Llama family (RMSNorm, gated MLP; a Llama teacher)
    "2-llama": (2, "chunked", 97, 0.5, "llama"),
    "3-llama": (3, "chunked", 97, 0.5, "llama"),
}


def _run(stage: int, loss: str, width: int, distill_weight: float | None, family: str = "gpt_neox") -> dict:
    """Losses of STEPS optimizer steps of a tiny MLKV model (owner and served layers) with compiled
    layers, and the parameters that do not start 16-byte aligned; any dynamo recompilation beyond one
    per kind of layer raises. With `distill_weight`, distilled from a multi-head teacher (compiled)."""
    from helpers import random_mlkv, tiny_config

    from megatron_mlkv.training.distill import Distillation
    from megatron_mlkv.training.engine import compile_blocks, make_engine

    torch._dynamo.reset()
    model = random_mlkv(tiny_config(kv_layers=2, num_kv_heads=2, intermediate_size=width, family=family), std=0.05)
    compile_blocks(model)
    distill = None
    if distill_weight is not None:
        teacher = random_mlkv(tiny_config(family=family), seed=3, std=0.2).requires_grad_(False)
        compile_blocks(teacher)
        distill = Distillation(teacher, distill_weight, 2.0)
        teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    zero = {"stage": stage}
    if stage == 3:  # partition every weight of the tiny model, as on a GPU the large ones are
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0)
    ds_config = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
    }
    engine = make_engine(model, ds_config, lr=1e-2, total_steps=STEPS, loss=loss, distill=distill)
    # DeepSpeed's process-wide F.linear of ZeRO-3 guards on each weight's id inside compiled code
    assert torch.nn.functional.linear.__module__ == "torch._C._nn", torch.nn.functional.linear
    misaligned = [n for n, p in engine.module.named_parameters() if p.data_ptr() % 16]
    ids = torch.randint(0, model.config.vocab_size, (MICRO, SEQ), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(STEPS):  # one batch again and again: its loss must fall
        total = engine(ids, ids)
        engine.backward(total)
        engine.step()
        losses.append(total.item())
    result = {"losses": losses, "misaligned": misaligned}
    if distill is not None:  # the teacher is nothing DeepSpeed partitions, optimises or saves
        result["teacher_unchanged"] = all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
        wrapped = {id(p) for p in engine.module.parameters()}
        result["teacher_wrapped"] = any(id(p) in wrapped for p in teacher.parameters())
        result["only_student_saved"] = set(engine.module.state_dict()) == {f"model.{k}" for k in model.state_dict()}
        result["kl"] = engine.module.terms["kl"].item()
    engine.destroy()
    return result


def _worker(rank: int, workdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", DS_ACCELERATOR="cpu")
    dist.init_process_group(
        "gloo", init_method=f"file://{workdir}/store", rank=0, world_size=1, timeout=timedelta(seconds=180)
    )
    # the owner layer and the served layer compile once each (and a teacher's layers, without
    # gradients); ZeRO-3's per-module hooks inside a compiled layer would be compiled once per module,
    # hit this limit and raise
    torch._dynamo.config.recompile_limit = 3
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    results = {}
    try:
        for case, args in CASES.items():
            try:
                results[case] = _run(*args)
            except Exception:
                results[case] = traceback.format_exc()
    finally:
        Path(workdir, "runs.json").write_text(json.dumps(results))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("engine")
    mp.spawn(_worker, args=(str(workdir),), nprocs=1, join=True)
    return json.loads((workdir / "runs.json").read_text())


def _losses(runs: dict, case: str) -> list[float]:
    assert isinstance(runs[case], dict), runs[case]  # a traceback: the recompilation limit, or another failure
    return runs[case]["losses"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, ref", [("3-chunked", "2-chunked"), ("3-logits", "2-chunked"), ("2-odd", "3-odd"), ("3-llama", "2-llama")]
)
def test_zero3_compiled_layers_train_as_zero2(runs, case, ref):
    want = _losses(runs, ref)
    assert _losses(runs, case) == pytest.approx(want, rel=1e-5)
    assert want[-1] < want[0]  # the steps trained


@pytest.mark.slow
def test_zero2_starts_every_parameter_aligned_with_an_odd_mlp_width(runs):
    """ZeRO-2's flat buffer would put every parameter after the 97-wide bias at an odd address (on a
    GPU: "misaligned address" in the compiled layers); DeepSpeed pads between them when asked."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    if "parameter_alignment" not in DeepSpeedZeroConfig.model_fields:
        pytest.skip("this DeepSpeed has no parameter_alignment (make_engine refuses odd widths on GPUs)")
    assert _losses(runs, "2-odd")
    assert runs["2-odd"]["misaligned"] == [] and runs["2-chunked"]["misaligned"] == []


@pytest.mark.slow
def test_distillation_trains_alike_under_zero2_and_zero3_and_a_zero_weight_changes_nothing(runs):
    """The teacher is replicated (no submodule of what DeepSpeed wraps): ZeRO-3 equals ZeRO-2; it never
    changes, is not among the parameters DeepSpeed wraps and in no checkpoint. A = 0 is the plain run,
    the KL still measured."""
    assert _losses(runs, "3-distill") == pytest.approx(_losses(runs, "2-distill"), rel=1e-5)
    assert _losses(runs, "2-distill-A0") == pytest.approx(_losses(runs, "2-chunked"), rel=1e-6)
    for case in ("2-distill", "3-distill", "2-distill-A0"):
        r = runs[case]
        assert r["teacher_unchanged"] and not r["teacher_wrapped"] and r["only_student_saved"], case
        assert r["kl"] > 0.1, case


@pytest.mark.parametrize("pads", [True, False])
def test_odd_widths_get_parameter_alignment_or_a_one_line_refusal(monkeypatch, pads):
    """The ZeRO config make_engine hands DeepSpeed. A DeepSpeed that cannot pad is refused for a model
    off the CPU (here on the meta device, standing in for a GPU); on the CPU nothing needs aligning."""
    from helpers import random_mlkv, tiny_config

    from megatron_mlkv.model import MLKVTransformer
    from megatron_mlkv.training import engine

    monkeypatch.setattr(engine, "deepspeed_pads_parameters", lambda: pads)
    even, odd = (random_mlkv(tiny_config(intermediate_size=w)) for w in (96, 97))
    assert engine.aligned_zero_config(even, {"stage": 2}) == {"stage": 2}
    assert engine.aligned_zero_config(odd, {"stage": 3}) == {"stage": 3}  # ZeRO-3 does not flatten
    assert engine.aligned_zero_config(odd, {"stage": 2, "parameter_alignment": False})["parameter_alignment"] is False
    with torch.device("meta"):
        odd_gpu = MLKVTransformer(tiny_config(intermediate_size=97))
    if pads:
        assert engine.aligned_zero_config(odd, {"stage": 1}) == {"stage": 1, "parameter_alignment": True}
        assert engine.aligned_zero_config(odd_gpu, {"stage": 2}) == {"stage": 2, "parameter_alignment": True}
    else:
        assert engine.aligned_zero_config(odd, {"stage": 1}) == {"stage": 1}
        with pytest.raises(
            UptrainError, match=r"^parameter layers\.0\.mlp\.dense_h_to_4h\.bias has 97 elements.*0\.19\.7"
        ):
            engine.aligned_zero_config(odd_gpu, {"stage": 2})
