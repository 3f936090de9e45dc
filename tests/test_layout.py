import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_mlkv.layout import KVLayout, LayoutError, cache_size_table, uniform_owners

ROOT = Path(__file__).resolve().parents[1]
PAPER_LAYOUTS = {  # name: (m, g) for l = 12, h = 12
    "MHA": (12, 12),
    "GQA-48": (12, 4),
    "MLKV-48": (4, 12),
    "MQA-12": (12, 1),
    "MLKV-12": (4, 3),
    "MLKV-6": (6, 1),
    "MLKV-4": (4, 1),
    "MLKV-2": (2, 1),
    "MLKV-1": (1, 1),
}


@pytest.mark.parametrize("name", PAPER_LAYOUTS)
def test_paper_rules(name):
    m, g = PAPER_LAYOUTS[name]
    layout = KVLayout.uniform(12, 12, m, g)
    assert layout.name == name
    assert layout.kv_layers == m and layout.kv_heads_total() == m * g
    for n in range(1, 13):  # the paper's 1-based rule: layer n takes KV from owner k = floor((n-1)/(l/m)) + 1,
        k = math.floor((n - 1) / (12 / m)) + 1  # the first layer of the k-th block of l/m layers
        assert layout.cache_slot(n - 1) + 1 == k
        assert layout.kv_owner[n - 1] == (k - 1) * (12 // m)
    for i in range(1, 13):  # query head i uses KV group floor((i-1)/(h/g)) + 1
        assert (i - 1) // layout.query_group_size + 1 == math.floor((i - 1) / (12 / g)) + 1


@pytest.mark.parametrize("l,m", [(12, 5), (24, 7), (16, 3), (6, 4)])
def test_non_integer_ratio_uses_the_stated_owner_rule(l, m):
    layout = KVLayout.uniform(l, 8, m, 2)
    expected_owners = sorted({0, *(int((i + 1) * l / m) for i in range(m - 1))})
    assert list(layout.owners) == expected_owners
    for layer, owner in enumerate(layout.kv_owner):
        assert owner == max(o for o in expected_owners if o <= layer)
        assert layout.cache_slot(layer) == expected_owners.index(owner)
    assert sum(len(layout.served_layers(o)) for o in layout.owners) == l


def test_explicit_map():
    layout = KVLayout(6, 4, 2, (0, 0, 0, 3, 3, 0))
    assert layout.owners == (0, 3) and layout.served_layers(0) == (0, 1, 2, 5)
    assert layout.name == "MLKV-4" and not layout.is_uniform
    assert layout.cache_elements(batch=3, seq=5, head_dim=16) == 2 * 3 * 5 * 2 * 2 * 16


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(num_layers=4, num_heads=6, num_kv_heads=4, kv_owner=(0, 1, 2, 3)), "g) = 4"),
        (dict(num_layers=4, num_heads=4, num_kv_heads=2, kv_owner=(0, 1, 2)), "3 entries"),
        (dict(num_layers=4, num_heads=4, num_kv_heads=2, kv_owner=(0, 2, 2, 3)), "kv_owner[1] = 2"),
        (dict(num_layers=4, num_heads=4, num_kv_heads=2, kv_owner=(0, 0, 1, 3)), "layer 1 does not own"),
        (dict(num_layers=4, num_heads=4, num_kv_heads=2, kv_owner=(1, 1, 2, 3)), "kv_owner[0] = 1"),
    ],
)
def test_invalid_layouts_name_the_value(kwargs, needle):
    with pytest.raises(
        LayoutError, match=needle.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")
    ):
        KVLayout(**kwargs)


@pytest.mark.parametrize("m", [0, 13, -1])
def test_kv_layers_out_of_range(m):
    with pytest.raises(LayoutError, match=f"kv_layers \\(m\\) = {m}"):
        uniform_owners(12, m)


def test_opt_175b_table():
    rows = {r["scheme"]: r for r in cache_size_table(96, 96, 128, 8, 1024, kv_layers=24, kv_groups=8)}
    assert rows["MHA"]["gib"] == 36.0
    b, s, l, h, dk, m, g = 8, 1024, 96, 96, 128, 24, 8
    assert rows["MHA"]["elements"] == 2 * b * s * l * h * dk
    assert rows["GQA"]["elements"] == 2 * b * s * l * g * dk
    assert rows["MQA"]["elements"] == 2 * b * s * l * dk
    assert rows["MLKV"]["elements"] == 2 * b * s * m * g * dk
    assert rows["MLKV"]["bytes"] == 2 * rows["MLKV"]["elements"]
    assert rows["MLKV"]["ratio_to_mha"] == pytest.approx(m * g / (l * h))


def test_kv_cache_size_cli(tmp_path):
    out = tmp_path / "t.json"
    cmd = [
        sys.executable,
        str(ROOT / "launch/kv_cache_size.py"),
        "--layers",
        "96",
        "--heads",
        "96",
        "--head-dim",
        "128",
        "--batch",
        "8",
        "--seq",
        "1024",
        "--kv-layers",
        "12",
        "--kv-groups",
        "1",
        "--dtype",
        "fp16",
        "--json",
        str(out),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "| MHA |" in res.stdout and "36.000" in res.stdout
    rows = {r["scheme"]: r for r in json.loads(out.read_text())}
    assert rows["MLKV"]["bytes"] == 2 * 8 * 1024 * 12 * 1 * 128 * 2
    bad = subprocess.run(cmd[:-4] + ["--kv-groups", "5"], capture_output=True, text=True)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        "error: kv_groups (g) = 5 must divide num_heads (h) = 96; allowed: [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 96]"
    ]


def test_kv_cache_size_cli_takes_a_preset_and_refuses_sizes_below_one():
    """--preset fills l, h and d_k (Llama-3.2-1B: 16 layers, 32 heads of 64); zero or negative sizes
    are a usage error, not a division by zero or a negative size."""
    from megatron_mlkv.config import preset

    script = str(ROOT / "launch/kv_cache_size.py")
    args = ["--preset", "llama-3.2-1b", "--batch", "8", "--seq", "2048", "--kv-layers", "8", "--kv-groups", "1"]
    res = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=True)
    shape = preset("llama-3.2-1b")
    mlkv = next(line for line in res.stdout.splitlines() if line.startswith("| MLKV |"))
    assert f"| {2 * 8 * 2048 * 8 * 1 * shape.head_dim * 2:,} |" in mlkv and shape.head_dim == 64
    for flag, value in (("--seq", "0"), ("--batch", "-1")):
        bad = subprocess.run([sys.executable, script, *args, flag, value], capture_output=True, text=True)
        assert (
            bad.returncode == 2 and f"{value} is not a positive integer" in bad.stderr and "Traceback" not in bad.stderr
        )
