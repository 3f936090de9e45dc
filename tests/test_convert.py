"""Checkpoint conversion: GPT-NeoX folders (every weight format) -> MHA/GQA/MQA/MLKV folders.

Expected weights are computed here by slicing `query_key_value` rows by hand, never with the
library's helpers, so a wrong split or merge cannot agree with itself.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import gpt_neox
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

from megatron_mlkv.config import ConfigError, MLKVConfig, preset
from megatron_mlkv.conversion import (
    REPORT_NAME,
    convert_checkpoint,
    convert_paper_variants,
    convert_state_dict,
    format_report,
    matched_intermediate_size,
    paper_variants,
    target_config,
)
from megatron_mlkv.errors import CheckpointError
from megatron_mlkv.layout import KVLayout
from megatron_mlkv.loading import load_pretrained
from megatron_mlkv.model import MLKVTransformer

pytestmark = pytest.mark.compat  # transformers' GPT-NeoX and checkpoint formats: also run by `make test-compat`

ROOT = Path(__file__).resolve().parents[1]

# The paper's Table 2 (Pythia-160M): name, m, g, parameters.
TABLE_2 = [
    ("GQA-48", 12, 4, 162_316_800),
    ("MLKV-48", 4, 12, 162_316_800),
    ("MQA-12", 12, 1, 162_332_940),
    ("MLKV-12", 4, 3, 162_332_940),
    ("MLKV-6", 6, 1, 162_332_556),
    ("MLKV-4", 4, 1, 162_320_132),
    ("MLKV-2", 2, 1, 162_326_152),
    ("MLKV-1", 1, 1, 162_319_940),
]
PYTHIA_160M_PARAMS = 162_322_944


# ---------------------------------------------------------------------------------------------
# builders
# ---------------------------------------------------------------------------------------------


def pythia_160m_hf_config() -> GPTNeoXConfig:
    shape = preset("pythia-160m")
    return GPTNeoXConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        intermediate_size=shape.intermediate_size,
        rotary_pct=0.25,
        max_position_embeddings=2048,
        bos_token_id=0,
        eos_token_id=0,
    )


def save_base(
    model: GPTNeoXForCausalLM, path: Path, fmt: str = "safetensors", tokenizer_dir: Path | None = None
) -> Path:
    """Write `model` as a hub-style folder. transformers 5 writes safetensors only, so the
    pytorch_model.bin variants are written by hand: `bin` with the hub's `embed_out.weight`,
    `bin-sharded` with transformers' in-memory `lm_head.weight` name (5.14 on) and an index."""
    if fmt == "safetensors":
        model.save_pretrained(path)
    elif fmt == "sharded":
        model.save_pretrained(path, max_shard_size="40KB")
    else:
        path.mkdir(parents=True)
        model.config.save_pretrained(path)
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        head = sd.pop("lm_head.weight" if "lm_head.weight" in sd else "embed_out.weight")
        sd["embed_out.weight" if fmt == "bin" else "lm_head.weight"] = head
        if fmt == "bin":
            torch.save(sd, path / "pytorch_model.bin")
        else:
            names = sorted(sd)
            shards = {
                "pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
                "pytorch_model-00002-of-00002.bin": names[len(names) // 2 :],
            }
            for shard, keys in shards.items():
                torch.save({k: sd[k] for k in keys}, path / shard)
            index = {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
            (path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            (path / f.name).write_bytes(f.read_bytes())
    return path


def qkv_rows(model: GPTNeoXForCausalLM, layer: int, part: int, kind: str = "weight") -> list[torch.Tensor]:
    """Per head a, the rows of `query_key_value` for part 0 (Q), 1 (K) or 2 (V): GPT-NeoX lays the
    rows out as head 0 [q, k, v], head 1 [q, k, v], ... with d_k rows each."""
    cfg = model.config
    h = cfg.num_attention_heads
    dk = cfg.hidden_size // h
    qkv = getattr(model.gpt_neox.layers[layer].attention.query_key_value, kind).detach()
    heads = []
    for a in range(h):
        start = a * 3 * dk + part * dk
        heads.append(qkv[start : start + dk])
    return heads


def expected_kv(model, served: list[int], g: int, part: int, merge: str, kind: str = "weight") -> torch.Tensor:
    """The merged K (part 1) or V (part 2) of an owner, computed head by head and layer by layer."""
    per_layer = []
    for layer in served:
        heads = qkv_rows(model, layer, part, kind)
        size = len(heads) // g
        groups = [sum(heads[j * size : (j + 1) * size]) / size for j in range(g)]
        per_layer.append(torch.cat(groups))
    if merge == "mean":
        return sum(per_layer) / len(per_layer)
    merged = per_layer[0]
    for t in per_layer[1:]:
        merged = (merged + t) / 2
    return merged


def load_out(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()


def out_tensors(path: Path) -> dict:
    """The converted weights, names without the wrapper's `model.` prefix."""
    sd = {}
    for f in sorted(path.glob("*.safetensors")):
        sd.update({k.removeprefix("model."): v for k, v in load_file(f).items()})
    return sd


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, tokenizer_dir):
    """l=4, h=4, d=64 GPT-NeoX with special token ids and a tokenizer, as safetensors."""
    ref = gpt_neox(num_hidden_layers=4, vocab_size=300, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    return ref, save_base(ref, tmp_path_factory.mktemp("base") / "tiny", tokenizer_dir=tokenizer_dir)


# ---------------------------------------------------------------------------------------------
# Table 2
# ---------------------------------------------------------------------------------------------


def test_table_2_parameter_counts_through_the_conversion_path():
    """All eight counts from the real conversion of a Pythia-160M-shaped GPTNeoXForCausalLM, built
    on the meta device (shapes only, no memory, no download)."""
    hf_cfg = pythia_160m_hf_config()
    with torch.device("meta"):
        ref = GPTNeoXForCausalLM(hf_cfg)
    base = MLKVConfig.from_hf(hf_cfg)
    assert sum(p.numel() for p in ref.parameters()) == base.num_parameters() == PYTHIA_160M_PARAMS
    assert [(n.lower(), m, g) for n, m, g, _ in TABLE_2] == paper_variants(12, 12)
    for name, m, g, params in TABLE_2:
        target = target_config(base, m, g)
        assert target.layout.name == name
        assert target.num_parameters() == params, name
        sd = convert_state_dict(ref.state_dict(), base, target)
        assert sum(t.numel() for t in sd.values()) == params, name
        with torch.device("meta"):
            model = MLKVTransformer(target)
        assert sum(p.numel() for p in model.parameters()) == params, name
        assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # --no-match-params: the MLPs keep the base's width, the count drops by the lost K/V projections
    mlkv6 = target_config(base, 6, 1, match_params=False)
    assert mlkv6.intermediate_size == 3072
    assert mlkv6.num_parameters() == PYTHIA_160M_PARAMS - (144 - 6) * (2 * 768 * 64 + 2 * 64)


@pytest.mark.slow
def test_pythia_160m_on_disk_count_and_streaming_memory(tmp_path):
    """A real 160M-shaped checkpoint (bf16, random): MLKV-6 loads with exactly Table 2's count, and
    the conversion's peak RSS above the process's baseline stays under twice the checkpoint size."""
    torch.manual_seed(0)
    base_dir = tmp_path / "pythia-160m-shape"
    GPTNeoXForCausalLM._from_config(pythia_160m_hf_config(), dtype=torch.bfloat16).save_pretrained(
        base_dir, max_shard_size="200MB"
    )
    size = sum(f.stat().st_size for f in base_dir.glob("*.safetensors"))
    code = f"""
import json
import torch, transformers, safetensors
from megatron_mlkv.conversion import convert_checkpoint
def rss(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
start = rss("VmRSS:")
report = convert_checkpoint({str(base_dir)!r}, {str(tmp_path / "mlkv-6")!r}, 6, 1, progress=False)
print(json.dumps({{"peak": rss("VmHWM:") - start, "report": report}}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(res.stdout.splitlines()[-1])
    assert result["report"]["parameters"] == {"before": PYTHIA_160M_PARAMS, "after": 162_332_556}
    assert result["report"]["dtype"] == {"before": "bfloat16", "after": "bfloat16"}
    print(
        f"checkpoint {size / 2**20:.0f} MiB, conversion peak {result['peak'] / 2**20:.0f} MiB "
        f"({result['peak'] / size:.2f}x)"
    )
    assert result["peak"] < 1.5 * size  # the issue allows 2x; streaming measures about 1.05x
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "mlkv-6", trust_remote_code=True)
    assert sum(p.numel() for p in model.parameters()) == 162_332_556
    assert model.config.num_kv_heads == 1 and model.config.kv_owner == [0, 0, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10]


# ---------------------------------------------------------------------------------------------
# function preservation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "bin", "bin-sharded"])
def test_mha_to_mha_is_the_identity_after_a_save_load_round_trip(tmp_path, fmt):
    ref = gpt_neox(num_hidden_layers=3)
    base = save_base(ref, tmp_path / "base", fmt)
    if fmt == "sharded":
        assert len(list(base.glob("*.safetensors"))) > 1
    report = convert_checkpoint(base, tmp_path / "mha", progress=False)
    assert report["layout"] == "MHA" and report["parameters"]["before"] == report["parameters"]["after"]
    ids = torch.randint(0, 101, (2, 24))
    assert torch.allclose(logits(load_out(tmp_path / "mha"), ids), logits(ref, ids), atol=1e-5)
    sd = out_tensors(tmp_path / "mha")
    assert torch.equal(sd["layers.1.attention.key.weight"], torch.cat(qkv_rows(ref, 1, 1)))
    assert torch.equal(sd["layers.2.attention.query.bias"], torch.cat(qkv_rows(ref, 2, 0, "bias")))
    assert torch.equal(sd["embed_out.weight"], ref.get_output_embeddings().weight)


def test_tied_embeddings_without_bias_round_trip(tmp_path):
    ref = gpt_neox(tie_word_embeddings=True, attention_bias=False)
    convert_checkpoint(save_base(ref, tmp_path / "base"), tmp_path / "out", progress=False)
    out = load_out(tmp_path / "out")
    assert out.config.tie_word_embeddings and not out.config.attention_bias
    ids = torch.randint(0, 101, (2, 16))
    assert torch.allclose(logits(out, ids), logits(ref, ids), atol=1e-5)


def share_kv_within_groups(ref: GPTNeoXForCausalLM, g: int) -> None:
    """Make the K/V heads of each query group identical (copies of the group's first head)."""
    cfg = ref.config
    h, dk = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    with torch.no_grad():
        for layer in ref.gpt_neox.layers:
            for p in (layer.attention.query_key_value.weight, layer.attention.query_key_value.bias):
                rows = p.view(h, 3, dk, *p.shape[1:])
                for a in range(h):
                    rows[a, 1:] = rows[(a // (h // g)) * (h // g), 1:]


def test_gqa_conversion_is_lossless_when_group_heads_are_identical(tmp_path):
    ref = gpt_neox(num_hidden_layers=3)
    share_kv_within_groups(ref, g=2)
    base = save_base(ref, tmp_path / "base")
    ids = torch.randint(0, 101, (2, 24))
    report = convert_checkpoint(base, tmp_path / "gqa", kv_groups=2, progress=False)
    assert report["layout"] == "GQA-6" and report["intermediate_size"]["after"] > 96  # the MLPs grew
    assert torch.allclose(logits(load_out(tmp_path / "gqa"), ids), logits(ref, ids), atol=1e-5)
    # the reference's copied output weights change the function; zero output weights do not
    convert_checkpoint(base, tmp_path / "copy", kv_groups=2, mlp_init="copy", progress=False)
    assert (logits(load_out(tmp_path / "copy"), ids) - logits(ref, ids)).abs().max() > 1e-2


@pytest.mark.parametrize("owner_map", ["0,0,2,2", "0,0,0,3"])
def test_mlkv_conversion_is_lossless_when_served_layers_see_the_owner_k_v(tmp_path, owner_map):
    """Served layers get the owner's K/V rows and input layer norm, and every layer but the last of
    each block adds only a constant vector to the residual stream (which LayerNorm removes), so
    each served layer's base K/V equal its owner's: the conversion must then be exact."""
    owners = [int(o) for o in owner_map.split(",")]
    ref = gpt_neox(num_hidden_layers=4)
    share_kv_within_groups(ref, g=2)
    h, dk = 4, 16
    layers = ref.gpt_neox.layers
    with torch.no_grad():
        for i, o in enumerate(owners):
            if o != i:
                for p_i, p_o in (
                    (layers[i].attention.query_key_value.weight, layers[o].attention.query_key_value.weight),
                    (layers[i].attention.query_key_value.bias, layers[o].attention.query_key_value.bias),
                ):
                    p_i.view(h, 3, dk, *p_i.shape[1:])[:, 1:] = p_o.view(h, 3, dk, *p_o.shape[1:])[:, 1:]
                layers[i].input_layernorm.load_state_dict(layers[o].input_layernorm.state_dict())
            if i + 1 < len(owners) and owners[i + 1] == o:  # not the last layer of its block
                layers[i].attention.dense.weight.zero_()
                layers[i].attention.dense.bias.fill_(0.3)
                layers[i].mlp.dense_4h_to_h.weight.zero_()
                layers[i].mlp.dense_4h_to_h.bias.fill_(-0.2)
    base = save_base(ref, tmp_path / "base")
    report = convert_checkpoint(base, tmp_path / "mlkv", kv_owner=owner_map, kv_groups=2, progress=False)
    assert report["kv_owner"] == owners and report["kv_heads"] == {"before": 16, "after": 4}
    ids = torch.randint(0, 101, (2, 24))
    assert torch.allclose(logits(load_out(tmp_path / "mlkv"), ids), logits(ref, ids), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# the merge rules and the MLP widening, against hand computations
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("merge", ["mean", "sequential"])
def test_merge_modes_match_a_hand_computation(tmp_path, merge):
    """l=4, h=2, m=1, g=1: one owner takes the K/V of all four layers."""
    ref = gpt_neox(num_hidden_layers=4, num_attention_heads=2, hidden_size=8, intermediate_size=16, rotary_pct=0.5)
    base = save_base(ref, tmp_path / "base")
    convert_checkpoint(base, tmp_path / merge, kv_layers=1, kv_groups=1, merge=merge, progress=False)
    sd = out_tensors(tmp_path / merge)
    for part, name in ((1, "key"), (2, "value")):
        for kind in ("weight", "bias"):
            # explicit weights: mean = 1/4 each; sequential = ((L0 + L1)/2 + L2)/2 + L3)/2 = 1/8, 1/8, 1/4, 1/2
            per_layer = [(qkv_rows(ref, j, part, kind)[0] + qkv_rows(ref, j, part, kind)[1]) / 2 for j in range(4)]
            weights = [0.25] * 4 if merge == "mean" else [0.125, 0.125, 0.25, 0.5]
            by_weights = sum(w * t for w, t in zip(weights, per_layer))
            got = sd[f"layers.0.attention.{name}.{kind}"]
            assert torch.allclose(got, by_weights, atol=1e-6)
            assert torch.allclose(got, expected_kv(ref, [0, 1, 2, 3], 1, part, merge, kind), atol=1e-6)
    for j in range(1, 4):
        assert f"layers.{j}.attention.key.weight" not in sd and f"layers.{j}.attention.value.bias" not in sd
    for j in range(4):
        assert torch.equal(sd[f"layers.{j}.attention.query.weight"], torch.cat(qkv_rows(ref, j, 0)))


def test_sequential_and_mean_differ_and_mean_is_order_free(tmp_path):
    ref = gpt_neox(num_hidden_layers=4)
    base = save_base(ref, tmp_path / "base")
    convert_checkpoint(base, tmp_path / "mean", kv_layers=2, kv_groups=4, progress=False)
    convert_checkpoint(base, tmp_path / "seq", kv_layers=2, kv_groups=4, merge="sequential", progress=False)
    mean, seq = out_tensors(tmp_path / "mean"), out_tensors(tmp_path / "seq")
    # two served layers: a pairwise mean of two is the mean, so only a 3+ layer block could differ
    assert torch.allclose(mean["layers.2.attention.key.weight"], seq["layers.2.attention.key.weight"], atol=1e-6)
    convert_checkpoint(base, tmp_path / "mean1", kv_layers=1, kv_groups=4, progress=False)
    convert_checkpoint(base, tmp_path / "seq1", kv_layers=1, kv_groups=4, merge="sequential", progress=False)
    a, b = out_tensors(tmp_path / "mean1"), out_tensors(tmp_path / "seq1")
    assert (a["layers.0.attention.value.weight"] - b["layers.0.attention.value.weight"]).abs().max() > 1e-3
    assert torch.allclose(a["layers.0.attention.value.weight"], expected_kv(ref, [0, 1, 2, 3], 4, 2, "mean"), atol=1e-6)


@pytest.mark.parametrize("mlp_init", ["zero", "copy"])
def test_mlp_widening_zero_and_copy(tmp_path, mlp_init):
    ref = gpt_neox(num_hidden_layers=4)
    base = save_base(ref, tmp_path / "base")
    report = convert_checkpoint(base, tmp_path / "out", kv_layers=1, kv_groups=1, mlp_init=mlp_init, progress=False)
    # lost = (16 - 1) heads · (2·64·16 + 2·16) = 31,200; per layer 7,800; round(7800 / 64) // 2 = 61
    assert report["intermediate_size"] == {"before": 96, "after": 96 + 61}
    assert (
        report["parameters"]["after"]
        == MLKVConfig.from_hf(ref.config).with_layout(1, 1, intermediate_size=157).num_parameters()
    )
    sd = out_tensors(tmp_path / "out")
    for j in range(4):
        mlp = ref.gpt_neox.layers[j].mlp
        w_in, b_in, w_out = (
            sd[f"layers.{j}.mlp.dense_h_to_4h.weight"],
            sd[f"layers.{j}.mlp.dense_h_to_4h.bias"],
            sd[f"layers.{j}.mlp.dense_4h_to_h.weight"],
        )
        assert w_in.shape == (157, 64) and w_out.shape == (64, 157)
        assert torch.equal(w_in[:96], mlp.dense_h_to_4h.weight) and torch.equal(w_out[:, :96], mlp.dense_4h_to_h.weight)
        # the reference rule: added unit u copies unit u's input weights and bias ...
        assert torch.equal(w_in[96:], mlp.dense_h_to_4h.weight[:61]) and torch.equal(
            b_in[96:], mlp.dense_h_to_4h.bias[:61]
        )
        # ... and its output weights (copy) or starts silent (zero)
        expected_out = mlp.dense_4h_to_h.weight[:, :61] if mlp_init == "copy" else torch.zeros(64, 61)
        assert torch.equal(w_out[:, 96:], expected_out)
        assert torch.equal(sd[f"layers.{j}.mlp.dense_4h_to_h.bias"], mlp.dense_4h_to_h.bias)


def test_mlp_multiple_rounds_the_matched_width_and_keeps_the_function(tmp_path):
    """`--mlp-multiple 16`: the matched 157 units become 160 (the nearest multiple; float8 matmuls need
    multiples of 16), the added units start silent, so the converted model computes what it computes
    with 157, and the parameter count stays within half a multiple of units a layer of the base's."""
    ref = gpt_neox(num_hidden_layers=4)
    base = save_base(ref, tmp_path / "base")
    exact = convert_checkpoint(base, tmp_path / "exact", kv_layers=1, kv_groups=1, progress=False)
    rounded = convert_checkpoint(base, tmp_path / "r16", kv_layers=1, kv_groups=1, mlp_multiple=16, progress=False)
    assert exact["intermediate_size"]["after"] == 157 and rounded["intermediate_size"]["after"] == 160
    assert rounded["mlp_multiple"] == 16 and "a multiple of 16" in format_report(rounded)
    per_unit = 2 * 64 + 1  # an MLP unit: a row of the input matrix and its bias, a column of the output matrix
    assert rounded["parameters"]["after"] - exact["parameters"]["after"] == 4 * 3 * per_unit
    ids = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        logits = [load_pretrained(tmp_path / name).eval()(ids) for name in ("exact", "r16")]
    torch.testing.assert_close(logits[0], logits[1])
    # an MLP that needs no widening keeps the base's width, and a widened one is never narrower
    config = MLKVConfig.from_hf(ref.config)
    assert matched_intermediate_size(config, KVLayout.uniform(4, 4, 4, 4), 64) == 96
    assert matched_intermediate_size(config, KVLayout.uniform(4, 4, 4, 2), 1000) == 96


def test_no_match_params_keeps_the_mlp(tiny_base, tmp_path):
    _, base = tiny_base
    report = convert_checkpoint(base, tmp_path / "out", 2, 1, match_params=False, progress=False)
    assert report["intermediate_size"] == {"before": 96, "after": 96}
    assert report["parameters"]["after"] < report["parameters"]["before"]


def test_random_init_is_the_same_layout_with_fresh_weights(tiny_base, tmp_path):
    """The train-from-scratch baseline: the converted folder's layout, shapes, parameter count and
    tokenizer, none of the base's weights, GPT-NeoX's initialisation, reproducible by seed."""
    _, base = tiny_base
    ref = convert_checkpoint(base, tmp_path / "converted", 2, 1, progress=False)
    report = convert_checkpoint(base, tmp_path / "scratch", 2, 1, random_init=True, seed=3, progress=False)
    convert_checkpoint(base, tmp_path / "again", 2, 1, random_init=True, seed=3, progress=False)
    assert report["init"] == "random (seed 3)" and ref["init"] == "converted"
    assert report["parameters"] == ref["parameters"] and report["layout"] == ref["layout"]
    converted, scratch = (load_file(tmp_path / name / "model.safetensors") for name in ("converted", "scratch"))
    assert scratch.keys() == converted.keys()
    assert all(scratch[k].shape == converted[k].shape for k in converted)
    assert scratch.keys() == load_file(tmp_path / "again" / "model.safetensors").keys()
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert all(torch.equal(scratch[k], again[k]) for k in scratch)
    weight = scratch["model.layers.0.attention.query.weight"]
    assert not torch.equal(weight, converted["model.layers.0.attention.query.weight"])
    assert abs(weight.std().item() - 0.02) < 0.005  # initializer_range
    assert torch.equal(
        scratch["model.layers.0.input_layernorm.weight"],
        torch.ones_like(scratch["model.layers.0.input_layernorm.weight"]),
    )
    assert (tmp_path / "scratch" / "tokenizer.json").is_file()


# ---------------------------------------------------------------------------------------------
# owner maps, output folder, report, dtype, tokenizer
# ---------------------------------------------------------------------------------------------


def test_owner_map_uniform_equals_kv_layers_and_non_uniform_merges_its_blocks(tiny_base, tmp_path):
    ref, base = tiny_base
    convert_checkpoint(base, tmp_path / "uniform", kv_layers=2, kv_groups=2, progress=False)
    convert_checkpoint(base, tmp_path / "map", kv_owner="0,0,2,2", kv_groups=2, progress=False)
    a, b = out_tensors(tmp_path / "uniform"), out_tensors(tmp_path / "map")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report = convert_checkpoint(base, tmp_path / "odd", kv_owner=[0, 0, 0, 3], kv_groups=1, progress=False)
    assert report["owners"] == [0, 3] and not report["uniform"] and report["layout"] == "MLKV-2"
    sd = out_tensors(tmp_path / "odd")
    assert torch.allclose(sd["layers.0.attention.key.weight"], expected_kv(ref, [0, 1, 2], 1, 1, "mean"), atol=1e-6)
    assert torch.allclose(sd["layers.3.attention.value.bias"], expected_kv(ref, [3], 1, 2, "mean", "bias"), atol=1e-6)
    assert json.loads((tmp_path / "odd" / "config.json").read_text())["kv_owner"] == [0, 0, 0, 3]
    assert load_out(tmp_path / "odd").config.kv_owner == [0, 0, 0, 3]


def test_output_folder_report_tokenizer_and_special_tokens(tiny_base, tmp_path, tokenizer_dir):
    _, base = tiny_base
    out = tmp_path / "nested" / "mlkv-2"
    report = convert_checkpoint(base, out, 2, 1, report_path=tmp_path / "report.json", progress=False)
    assert json.loads((out / REPORT_NAME).read_text()) == json.loads((tmp_path / "report.json").read_text())
    assert report["layout"] == "MLKV-2" and report["kv_owner"] == [0, 0, 2, 2]
    assert report["kv_heads"] == {"before": 16, "after": 2}
    assert report["kv_bytes_per_token"]["float16"] == {"before": 2 * 16 * 16 * 2, "after": 2 * 2 * 16 * 2}
    assert report["kv_bytes_per_token"]["float32"] == {"before": 2 * 16 * 16 * 4, "after": 2 * 2 * 16 * 4}
    assert report["merge"] == "mean" and report["mlp_init"] == "zero"
    assert report["parameters"]["before"] == sum(p.numel() for p in tiny_base[0].parameters())
    assert "tokenizer.json" in report["tokenizer_files"]
    table = format_report(report)
    assert "MHA -> MLKV-2" in table and "| KV heads per token | 16 | 2 | 0.125 |" in table
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 0, 1)
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_mlkv.MLKVForCausalLM"
    text = "the cat ran in the park"
    assert (
        AutoTokenizer.from_pretrained(out)(text)["input_ids"]
        == AutoTokenizer.from_pretrained(tokenizer_dir)(text)["input_ids"]
    )
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    with pytest.raises(CheckpointError, match="already exists; pass --overwrite"):
        convert_checkpoint(base, out, 1, 1, progress=False)
    assert json.loads((out / REPORT_NAME).read_text())["layout"] == "MLKV-2"  # untouched
    assert convert_checkpoint(base, out, 1, 1, overwrite=True, progress=False)["layout"] == "MLKV-1"
    assert json.loads((out / "config.json").read_text())["kv_owner"] == [0, 0, 0, 0]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_dtype_defaults_to_the_base_and_can_be_changed(tmp_path):
    ref = gpt_neox().to(torch.float16)
    base = save_base(ref, tmp_path / "base")
    report = convert_checkpoint(base, tmp_path / "fp16", 3, 2, progress=False)
    assert report["dtype"] == {"before": "float16", "after": "float16"}
    assert all(t.dtype == torch.float16 for t in out_tensors(tmp_path / "fp16").values())
    report = convert_checkpoint(base, tmp_path / "fp32", 3, 2, dtype="float32", progress=False)
    assert report["dtype"] == {"before": "float16", "after": "float32"}
    assert set(report["kv_bytes_per_token"]) == {"float16", "float32"}
    sd = out_tensors(tmp_path / "fp32")
    assert all(t.dtype == torch.float32 for t in sd.values())
    # merged in float32 from the fp16 rows, so fp32 output is the exact mean, not a rounded one
    assert torch.allclose(sd["layers.0.attention.key.weight"], expected_kv(ref.float(), [0], 2, 1, "mean"), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# the paper's eight variants
# ---------------------------------------------------------------------------------------------


def test_paper_variants_produce_eight_folders(tmp_path):
    ref = gpt_neox(
        num_hidden_layers=12, num_attention_heads=12, hidden_size=96, intermediate_size=192, vocab_size=64, std=0.1
    )
    base = save_base(ref, tmp_path / "base")
    reports = convert_paper_variants(base, tmp_path / "variants", progress=False)
    names = [n.lower() for n, *_ in TABLE_2]
    assert sorted(p.name for p in (tmp_path / "variants").iterdir() if p.is_dir()) == sorted(names)
    assert [r["layout"] for r in reports] == [n for n, *_ in TABLE_2]
    base_cfg = MLKVConfig.from_hf(ref.config)
    for (name, m, g, _), r in zip(TABLE_2, reports):
        config = json.loads((tmp_path / "variants" / name.lower() / "config.json").read_text())
        assert config["num_kv_heads"] == g and len(set(config["kv_owner"])) == m
        assert r["parameters"]["after"] == target_config(base_cfg, m, g).num_parameters()
        assert r["kv_heads"]["after"] == m * g
    summary = json.loads((tmp_path / "variants" / "paper_variants.json").read_text())
    assert [r["layout"] for r in summary] == [r["layout"] for r in reports]
    ids = torch.randint(0, 64, (1, 10))
    assert logits(load_out(tmp_path / "variants" / "mlkv-6"), ids).shape == (1, 10, 64)
    with pytest.raises(CheckpointError, match="already exists"):
        convert_paper_variants(base, tmp_path / "variants", progress=False)


def test_paper_variants_of_other_shapes_keep_the_roles_or_are_refused():
    assert paper_variants(24, 6) == [
        ("gqa-48", 24, 2),
        ("mlkv-48", 8, 6),
        ("mqa-24", 24, 1),
        ("mlkv-24", 8, 3),
        ("mlkv-12", 12, 1),
        ("mlkv-8", 8, 1),
        ("mlkv-4", 4, 1),
        ("mlkv-1", 1, 1),
    ]
    for l, h in ((24, 16), (6, 12), (16, 12), (12, 3)):
        with pytest.raises(ConfigError, match="multiple of 6 .* multiple of 3"):
            paper_variants(l, h)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


def test_a_base_that_is_not_gpt_neox_is_refused_by_name(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)).save_pretrained(
        tmp_path / "gpt2"
    )
    with pytest.raises(
        CheckpointError,
        match=r"model_type 'gpt2' \(GPT2LMHeadModel\) is not supported; "
        r"supported: GPTNeoXForCausalLM",
    ):
        convert_checkpoint(tmp_path / "gpt2", tmp_path / "out", progress=False)


def test_an_already_converted_folder_is_refused(tiny_base, tmp_path):
    _, base = tiny_base
    convert_checkpoint(base, tmp_path / "mlkv", 2, 2, progress=False)
    with pytest.raises(CheckpointError, match="'mlkv_gpt_neox'.*already converted"):
        convert_checkpoint(tmp_path / "mlkv", tmp_path / "again", 1, 1, progress=False)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(kv_layers=5), r"kv_layers \(m\) = 5 must be between 1 and num_layers = 4"),
        (dict(kv_layers=0), r"kv_layers \(m\) = 0"),
        (dict(kv_groups=3), r"kv_groups \(g\) = 3 must divide num_heads \(h\) = 4; allowed: \[1, 2, 4\]"),
        (dict(kv_owner="0,1,0,5"), r"kv_owner\[3\] = 5"),
        (dict(kv_owner="0,0,2"), "3 entries, expected one per layer"),
        (dict(kv_owner="0,x,2,2"), "expected one layer index per layer"),
        (dict(kv_owner="0,0,2,2", kv_layers=3), "2 owner layers but kv_layers = 3"),
        (dict(merge="median"), "merge = 'median' is not supported"),
        (dict(mlp_init="random"), "mlp_init = 'random' is not supported"),
        (dict(dtype="int8"), "dtype 'int8' is not supported"),
        (dict(kv_layers=2, mlp_multiple=0), "mlp_multiple = 0 must be >= 1"),
    ],
)
def test_invalid_layouts_and_options(tiny_base, tmp_path, kwargs, message):
    _, base = tiny_base
    with pytest.raises(ConfigError, match=message):
        convert_checkpoint(base, tmp_path / "out", **kwargs, progress=False)
    assert not (tmp_path / "out").exists()


def copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_and_corrupt_weight_files_are_named(tmp_path):
    ref = gpt_neox()
    single, sharded, pickled = (save_base(ref, tmp_path / f, f) for f in ("safetensors", "sharded", "bin"))
    out = tmp_path / "out"

    gone = copy_folder(single, tmp_path / "gone")
    (gone / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=f"{gone}: no weight file; expected one of model.safetensors"):
        convert_checkpoint(gone, out, progress=False)

    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    partial = copy_folder(sharded, tmp_path / "partial")
    (partial / shard.name).unlink()
    with pytest.raises(
        CheckpointError,
        match=f"{partial / shard.name}: missing weight file \\(listed in model.safetensors.index.json\\)",
    ):
        convert_checkpoint(partial, out, progress=False)

    truncated = copy_folder(single, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{truncated / 'model.safetensors'}: corrupt or unreadable weight file"):
        convert_checkpoint(truncated, out, progress=False)

    bad_bin = copy_folder(pickled, tmp_path / "bad_bin")
    data = (bad_bin / "pytorch_model.bin").read_bytes()
    (bad_bin / "pytorch_model.bin").write_bytes(data[: len(data) - 200])
    with pytest.raises(CheckpointError, match=f"{bad_bin / 'pytorch_model.bin'}: corrupt or unreadable weight file"):
        convert_checkpoint(bad_bin, out, progress=False)

    bad_index = copy_folder(sharded, tmp_path / "bad_index")
    (bad_index / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: corrupt index file"):
        convert_checkpoint(bad_index, out, progress=False)
    assert not out.exists()


@pytest.mark.parametrize("fmt,value", [("safetensors", float("nan")), ("bin", float("inf"))])
def test_non_finite_base_weights_are_refused_by_file_and_tensor(tmp_path, fmt, value):
    ref = gpt_neox()
    with torch.no_grad():
        ref.gpt_neox.layers[1].mlp.dense_h_to_4h.weight[3, 5] = value
    base = save_base(ref, tmp_path / "base", fmt)
    weights = "model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"
    with pytest.raises(
        CheckpointError,
        match=f"{base / weights}: tensor 'gpt_neox.layers.1.mlp.dense_h_to_4h.weight' holds NaN or infinite values",
    ):
        convert_checkpoint(base, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_config_folder_tensor_and_head_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        convert_checkpoint(tmp_path / "nowhere", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        convert_checkpoint(tmp_path / "empty", tmp_path / "out", progress=False)
    ref = gpt_neox()
    base = save_base(ref, tmp_path / "base", "bin")
    sd = torch.load(base / "pytorch_model.bin")
    del sd["gpt_neox.layers.1.mlp.dense_4h_to_h.bias"]
    torch.save(sd, base / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="tensor 'gpt_neox.layers.1.mlp.dense_4h_to_h.bias' is missing"):
        convert_checkpoint(base, tmp_path / "out", progress=False)
    ref.gpt_neox.save_pretrained(tmp_path / "bare")  # GPTNeoXModel: no `gpt_neox.` prefix, no head
    with pytest.raises(CheckpointError, match="no output head"):
        convert_checkpoint(tmp_path / "bare", tmp_path / "out", progress=False)
    with pytest.raises(CheckpointError, match="is the base folder"):
        convert_checkpoint(tmp_path / "bare", tmp_path / "bare", overwrite=True, progress=False)


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------


def fake_hub_cache(root: Path, repo: str, files_from: Path) -> Path:
    """A Hugging Face cache holding `repo` (what a download leaves), so a hub name resolves offline."""
    commit = "0" * 40
    entry = root / f"models--{repo.replace('/', '--')}"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    copy_folder(files_from, entry / "snapshots" / commit)
    return root


def test_cli_converts_a_hub_name_and_reports(tiny_base, tmp_path, tokenizer_dir):
    """The real hub path (AutoConfig, cached_file for weights and tokenizer files) on a hub name
    served from a local cache with the hub offline, through the command line."""
    ref, base = tiny_base
    cache = fake_hub_cache(tmp_path / "hub", "local-org/tiny-neox", base)
    cmd = [
        sys.executable,
        str(ROOT / "launch" / "convert.py"),
        "--base",
        "local-org/tiny-neox",
        "--kv-layers",
        "2",
        "--kv-groups",
        "1",
        "--merge",
        "sequential",
        "--out",
        str(tmp_path / "mlkv-2"),
        "--report",
        str(tmp_path / "r.json"),
        "--no-progress",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "local-org/tiny-neox -> " in res.stdout and "| KV heads per token | 16 | 2 | 0.125 |" in res.stdout
    assert "Writing model shards" not in res.stderr + res.stdout  # --no-progress: transformers' bar too
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["merge"] == "sequential" and report["layout"] == "MLKV-2" and report["base"] == "local-org/tiny-neox"
    assert json.loads((tmp_path / "mlkv-2" / REPORT_NAME).read_text()) == report
    assert (tmp_path / "mlkv-2" / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()
    sd = out_tensors(tmp_path / "mlkv-2")
    assert torch.allclose(sd["layers.2.attention.key.weight"], expected_kv(ref, [2, 3], 1, 1, "sequential"), atol=1e-6)


def test_cli_errors_are_one_line_with_exit_code_2(tiny_base, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "launch"))
    try:
        from convert import main
    finally:
        sys.path.remove(str(ROOT / "launch"))
    _, base = tiny_base
    cases = [
        ["--base", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
        ["--base", str(base), "--kv-groups", "3", "--out", str(tmp_path / "o")],
        ["--base", str(base), "--out", str(base.parent)],
    ]
    for argv in cases:
        assert main(argv + ["--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    with pytest.raises(SystemExit) as exc:  # usage errors come from argparse, also exit code 2
        main(["--base", str(base), "--paper-variants"])
    assert exc.value.code == 2


def test_a_full_or_read_only_disk_is_one_line_and_leaves_nothing(tiny_base, tmp_path, capsys):
    """convert.py writing onto a 64 kB disk, or a read-only one: one line naming the folder and the
    cause, no traceback, and no half-written folder left behind."""
    from helpers import small_filesystem

    sys.path.insert(0, str(ROOT / "launch"))
    try:
        from convert import main
    finally:
        sys.path.remove(str(ROOT / "launch"))
    _, base = tiny_base
    for read_only, cause in ((False, "no space left on the device"), (True, "the file system is read-only")):
        with small_filesystem(tmp_path / f"disk-{read_only}", "64k", read_only) as disk:
            assert main(["--base", str(base), "--no-progress", "--out", str(disk / "mlkv")]) == 2
            (line,) = capsys.readouterr().err.strip().splitlines()
            assert line.startswith(f"error: {disk}") and cause in line, line
            assert not list(disk.iterdir())


# ---------------------------------------------------------------------------------------------
# the in-memory helpers keep their contracts
# ---------------------------------------------------------------------------------------------


def test_convert_layer_and_merge_kv_agree_with_convert_state_dict():
    from megatron_mlkv.conversion import convert_layer, merge_kv, split_qkv

    ref = gpt_neox(num_hidden_layers=4)
    base = MLKVConfig.from_hf(ref.config)
    target = target_config(base, 2, 2)
    sd = ref.state_dict()
    full = convert_state_dict(sd, base, target, merge="sequential")
    for layer in range(4):
        served = None
        if target.layout.owns_kv(layer):
            served = [
                {
                    "attention.query_key_value.weight": sd[f"gpt_neox.layers.{j}.attention.query_key_value.weight"],
                    "attention.query_key_value.bias": sd[f"gpt_neox.layers.{j}.attention.query_key_value.bias"],
                }
                for j in target.layout.served_layers(layer)
            ]
        one = convert_layer(sd, "gpt_neox.", base, target, layer, served, merge="sequential")
        assert one.keys() == {k for k in full if k.startswith(f"layers.{layer}.")}
        assert all(torch.allclose(one[k], full[k], atol=1e-6) for k in one)
    ks = [split_qkv(sd[f"gpt_neox.layers.{j}.attention.query_key_value.weight"], 4)[1] for j in (0, 1)]
    assert torch.allclose(merge_kv(ks, 2), expected_kv(ref, [0, 1], 2, 1, "mean"), atol=1e-6)
