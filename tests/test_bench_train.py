"""bench_train on the CPU: the memory mode (what a training forward saves for backward, by kind)
and the fresh process each measurement runs in."""

import os

import pytest
import torch
from helpers import tiny_config
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.bench_train import format_memory, format_table, in_fresh_process, saved_memory

CPU, S = torch.device("cpu"), 40  # unlike every width of the model, so shapes tell kinds apart


def test_saved_memory_finds_an_attention_matrix_and_kv_sharing_saves_no_more_than_mha():
    config = tiny_config(max_position_embeddings=64)  # l = 4, h = 4, d = 64, d_k = 16
    mha, mlkv, mqa = (
        saved_memory(config.with_layout(m, g), 2, S, CPU, torch.float32, "logits") for m, g in ((4, 4), (2, 1), (4, 1))
    )
    # the flash path keeps no s x s matrix; sharing K/V keeps less than MHA, never more
    assert all("attention scores (s x s)" not in r["saved_bytes"] for r in (mha, mlkv, mqa))
    assert mlkv["saved_total_bytes"] < mha["saved_total_bytes"] and mqa["saved_total_bytes"] < mha["saved_total_bytes"]
    assert mha["saved_total_bytes"] == sum(mha["saved_bytes"].values())
    logits = 2 * (S - 1) * config.vocab_size * 4  # float32 logits of the positions that predict, kept by the loss
    assert mha["saved_bytes"]["logits"] >= logits
    # the failure the mode is for: attention off the flash path keeps b·h·s·s scores in every layer
    with sdpa_kernel(SDPBackend.MATH):
        math = saved_memory(config.with_layout(2, 1), 2, S, CPU, torch.float32, "logits")
    assert math["saved_bytes"]["attention scores (s x s)"] >= config.num_layers * 2 * config.num_heads * S * S * 4
    table = format_memory([{"shape": "tiny", **mha}, {"shape": "tiny", **math}])
    assert table.splitlines()[0].count("|") == table.splitlines()[1].count("|") == table.splitlines()[2].count("|")
    assert "attention scores (s x s)" in table.splitlines()[0]


def test_each_measurement_runs_in_a_process_of_its_own():
    first, second = in_fresh_process(os.getpid), in_fresh_process(os.getpid)
    assert len({first, second, os.getpid()}) == 3
    with pytest.raises(ZeroDivisionError):  # a failure in the measurement reaches the caller
        in_fresh_process(divmod, 1, 0)


def test_table_ratios_divide_by_the_faster_transformers_engine():
    row = dict(shape="pythia-1b", layout="MHA", micro_batch=8, mfu=0.5, peak_memory_bytes=2**30, data_wait_share=0.0)
    speeds = {"hf": 60.0, "hf-compiled": 80.0, "mlkv": 100.0}
    table = format_table([dict(row, engine=e, tokens_per_s=v) for e, v in speeds.items()])
    ratios = {line.split(" | ")[2]: line.rstrip(" |").split(" | ")[-1] for line in table.splitlines()[2:]}
    assert ratios == {e: f"{v / max(speeds['hf'], speeds['hf-compiled']):.2f}x" for e, v in speeds.items()}


def test_matched_layouts_widen_the_mlp_as_conversion_does():
    """`mlkv-6@matched` is the converted checkpoint's shape (parameters of the MHA base, a wider MLP),
    so the benchmark can measure the widened MLP's share of memory; `mlkv-6` keeps the MHA width."""
    from benchmarks.bench_train import known_layout, layout_config
    from megatron_mlkv.config import preset

    mha, plain, matched = (layout_config("pythia-160m", name) for name in ("mha", "mlkv-6", "mlkv-6@matched"))
    assert plain.layout == matched.layout and plain.layout.name == "MLKV-6"
    assert plain.intermediate_size == mha.intermediate_size < matched.intermediate_size == 3809
    assert abs(matched.num_parameters() / mha.num_parameters() - 1) < 1e-4
    assert known_layout("mqa-12@matched") and not known_layout("mlkv-7") and not known_layout("mha@other")
    assert known_layout("mlkv-6@matched64") and not known_layout("mlkv-6@matched0")
    rounded = layout_config("pythia-1b", "mqa-12@matched64")  # convert.py --mlp-multiple 64
    assert layout_config("pythia-1b", "mqa-12@matched").intermediate_size == 9985  # no multiple of 16: no float8
    assert (
        rounded.intermediate_size == 9984
        and abs(rounded.num_parameters() / preset("pythia-1b").num_parameters() - 1) < 1e-4
    )


def test_distillation_cost_divides_by_the_plain_engine_of_the_same_shape_and_layout():
    from benchmarks.bench_train import format_distill_cost

    row = dict(micro_batch=8, mfu=0.5, data_wait_share=0.0)
    records = [
        dict(row, shape="pythia-1b", layout="MLKV-8", engine="mlkv", tokens_per_s=100.0, peak_memory_bytes=2 * 2**30),
        dict(row, shape="pythia-1b", layout="MHA", engine="mlkv", tokens_per_s=50.0, peak_memory_bytes=2**30),
        dict(
            row,
            shape="pythia-1b",
            layout="MLKV-8",
            engine="mlkv-distill",
            tokens_per_s=80.0,
            peak_memory_bytes=3 * 2**30,
        ),
    ]
    rows = format_distill_cost(records).splitlines()[2:]
    assert rows == ["| pythia-1b | MLKV-8 | 8 | 100 | 80 | 0.80x | 2.0 GiB | 3.0 GiB |"]
    assert format_distill_cost(records[:2]) == ""  # nothing distilled, no table


def test_llama_shapes_keep_their_own_layout_and_widen_three_matrices():
    """`--shapes llama-3.2-1b`: 'mha' is the shape's own GQA-8 (the teacher of mlkv-distill, and the
    one layout transformers' LlamaForCausalLM runs); @matched widens its gated MLP as conversion does."""
    from benchmarks.bench_train import layout_config

    base, plain, matched = (layout_config("llama-3.2-1b", n) for n in ("mha", "mlkv-6", "mlkv-6@matched"))
    assert base.layout.name == "GQA-128" and plain.layout.name == matched.layout.name == "MLKV-8"
    assert plain.intermediate_size == base.intermediate_size < matched.intermediate_size
    assert abs(matched.num_parameters() / base.num_parameters() - 1) < 1e-4


def test_the_precision_check_compares_float8_with_bf16_once_settled(tmp_path):
    """`--precision-data`: the largest relative difference after step 50 (what the first steps do is
    left out), and its plot."""
    from benchmarks.bench_train import plot_precision, settled_difference

    ref = [4.0] * 50 + [2.0] * 150
    curve = [8.0] * 50 + [2.0] * 99 + [2.06] + [2.0] * 50  # far off before step 50, 3% off at step 150
    assert settled_difference(ref, curve) == pytest.approx(0.03)
    assert settled_difference(ref, ref) == 0.0
    check = dict(shape="pythia-1b", layout="MHA", settled_after=50, curves={"mlkv": ref, "mlkv-fp8-rowwise": curve})
    assert plot_precision(check, tmp_path / "p.png").stat().st_size > 10_000
