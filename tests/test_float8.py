"""`--fp8`: which layers train in float8, the refusals, and float8 runs on the CPU through torchao's
emulation (the float8 casts and scales as on the GPU, the matmuls in float32)."""

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_config
from test_uptrain import STEPS, ds_config, losses, ok, run_single, uptrain
from test_uptrain import workdir as workdir  # noqa: F401 (the fixture: tokenizer, packs, a converted model)

from megatron_mlkv.loading import load_pretrained
from megatron_mlkv.model import MLKVTransformer
from megatron_mlkv.training.float8 import (
    DEFAULT_RECIPE,
    RECIPES,
    float8_modules,
    float8_problem,
    left_in_bf16,
    to_float8,
)
from megatron_mlkv.training.plan import FP8_EMULATE

torchao = pytest.importorskip("torchao.float8")
pytestmark = pytest.mark.compat  # torchao's float8 API


@pytest.mark.parametrize(
    "recipe, tp, capability, message",
    [
        ("blockwise", 1, (9, 0), "--fp8 blockwise: unknown recipe; choose tensorwise or rowwise"),
        (DEFAULT_RECIPE, 1, None, "compute capability 8.9 or later); none is visible"),
        (DEFAULT_RECIPE, 1, (8, 0), "this one has 8.0"),
        (DEFAULT_RECIPE, 2, (9, 0), "--fp8 does not combine with --tp"),
    ],
)
def test_where_float8_cannot_run_is_one_line(recipe, tp, capability, message):
    problem = float8_problem(recipe, tp, capability)
    assert message in problem and "\n" not in problem


def test_hopper_and_ada_pass_and_a_missing_torchao_is_named(monkeypatch):
    assert float8_problem("rowwise", 1, (9, 0)) is None and float8_problem("tensorwise", 1, (8, 9)) is None
    monkeypatch.setitem(__import__("sys").modules, "torchao.float8", None)  # import fails as if not installed
    assert "--fp8 needs torchao" in float8_problem("rowwise", 1, (9, 0))


def test_only_the_blocks_linear_layers_of_float8_shapes_are_converted():
    """Attention projections and MLP matrices of every layer; not the embedding, the norms or the
    output layer; not a matrix with a dimension that is no multiple of 16 (the odd MLP width the
    paper's parameter match can give: `convert.py --mlp-multiple 16` avoids it)."""
    model = MLKVTransformer(tiny_config(kv_layers=2, intermediate_size=100))  # 100: no multiple of 16
    names = float8_modules(model)
    owners = (0, 2)  # MLKV-2 of 4 layers: layers 1 and 3 compute no K/V
    parts = lambda i: ("query", "key", "value", "dense") if i in owners else ("query", "dense")  # noqa: E731
    assert names == [f"layers.{i}.attention.{p}" for i in range(4) for p in parts(i)]
    note = left_in_bf16(model)
    assert "64 x 100, 100 x 64 stay in bf16" in note and "--mlp-multiple 16" in note
    converted = to_float8(model, DEFAULT_RECIPE, emulate=True)
    assert converted == sorted(names)
    kinds = {name: type(module).__name__ for name, module in model.named_modules()}
    assert all(kinds[n] == "Float8Linear" for n in names)
    assert kinds["embed_out"] == "Linear" and kinds["layers.0.mlp.dense_h_to_4h"] == "Linear"
    widened = MLKVTransformer(tiny_config(kv_layers=2, intermediate_size=96))
    assert any(n.endswith("mlp.dense_4h_to_h") for n in float8_modules(widened)) and left_in_bf16(widened) is None


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_float8_training_steps_follow_the_full_precision_ones(recipe, family):
    """Same weights, the same batch 20 times, AdamW: the emulated float8 model's losses stay within 2%
    of the float32 model's, its gradients point the same way, and its state dict has the
    plain model's names (checkpoints and exports load into a model without float8)."""
    torch.manual_seed(0)
    config = tiny_config(kv_layers=2, family=family, hidden_size=64, intermediate_size=128)
    ref = MLKVTransformer(config)
    fp8 = copy.deepcopy(ref)
    to_float8(fp8, recipe, emulate=True)
    assert list(fp8.state_dict()) == list(ref.state_dict())
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in (ref, fp8)]
    gen = torch.Generator().manual_seed(1)
    data = torch.randint(0, config.vocab_size, (1, 4, 32), generator=gen).expand(20, 4, 32)  # one batch, learnt
    curves = {"ref": [], "fp8": []}
    for step, ids in enumerate(data):
        for name, model, opt in (("ref", ref, opts[0]), ("fp8", fp8, opts[1])):
            logits = model(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            if step == 0:
                g = model.layers[1].mlp
                grad = (g.dense_h_to_4h if family == "gpt_neox" else g.up_proj).weight.grad.flatten()
                curves.setdefault("grad0", []).append(grad.clone())
            opt.step()
            curves[name].append(loss.item())
    assert curves["ref"][-1] < curves["ref"][0] - 0.2  # it learns, so the comparison means something
    for a, b in zip(curves["ref"], curves["fp8"]):
        assert b == pytest.approx(a, rel=0.02)
    ref_grad, fp8_grad = curves["grad0"]
    assert torch.nn.functional.cosine_similarity(ref_grad, fp8_grad, dim=0) > 0.99
    assert not torch.equal(ref_grad, fp8_grad)  # float8 did round: the comparison is not of one model twice
    MLKVTransformer(config).load_state_dict(fp8.state_dict())  # strict: the names and shapes of a plain model


# --- launch/uptrain.py --fp8 ---------------------------------------------------------------------

EMULATE = {FP8_EMULATE: "1"}
ROOT = Path(__file__).resolve().parents[1]


def test_fp8_without_a_float8_gpu_is_one_line_before_the_first_step(workdir, tmp_path):
    result = run_single(workdir, tmp_path, "--fp8")
    assert result.returncode == 2 and result.stderr.startswith("error: --fp8 needs a GPU with float8 matrix units")
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_fp8_runs_follow_the_full_precision_run_resume_exactly_and_export_plain_models(workdir, tmp_path):
    """Two ranks, emulated float8: ZeRO-2 (packed parameters) within 2% of the plain run's losses;
    killed in a save and rerun, the losses of the uninterrupted float8 run; ZeRO-3 (each layer one
    unit) the same as ZeRO-2; the export a plain model."""
    zero2 = ds_config(workdir, "zero2.json")
    plain, fp8, killed = tmp_path / "plain", tmp_path / "fp8", tmp_path / "killed"
    ok(uptrain(workdir, plain, zero2, "--save-interval", 4))
    ok(uptrain(workdir, fp8, zero2, "--save-interval", 4, "--fp8", env=EMULATE))
    for step, loss in losses(plain).items():
        assert losses(fp8)[step] == pytest.approx(loss, rel=0.02), step
    assert losses(fp8) != losses(plain)  # float8 rounding happened
    assert json.loads((fp8 / "run_config.json").read_text())["fp8"] == "tensorwise"
    assert uptrain(
        workdir, killed, zero2, "--save-interval", 4, "--fp8", env={**EMULATE, "MLKV_FAULT": "kill-in-save@8"}
    ).returncode
    ok(uptrain(workdir, killed, zero2, "--save-interval", 4, "--fp8", env=EMULATE))
    assert losses(killed) == losses(fp8)
    zero = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())["zero_optimization"]
    zero3 = ds_config(workdir, "zero3.json", zero_optimization={**zero, "stage3_param_persistence_threshold": 0})
    ok(uptrain(workdir, tmp_path / "zero3", zero3, "--save-interval", 8, "--fp8", env=EMULATE))
    for step, loss in losses(fp8).items():
        assert losses(tmp_path / "zero3")[step] == pytest.approx(loss, rel=1e-5), step
    model = load_pretrained(fp8 / "hf" / f"step_{STEPS}")
    assert not any("Float8" in type(m).__name__ for m in model.modules())
