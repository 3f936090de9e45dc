"""bench_train's memory mode: what a training forward saves for backward, by kind (CPU)."""

import torch
from helpers import tiny_config
from torch.nn.attention import SDPBackend, sdpa_kernel

from megatron_mlkv.bench_train import format_memory, saved_memory

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
