"""`make demo`'s pipeline end to end, shortened: corpus -> tokenizer -> pack -> base -> convert ->
deepspeed uptraining (2 ranks, ZeRO-2) -> table."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.compat  # the whole pipeline: also run by `make test-compat`

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_pipeline_recovers_the_converted_model(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "demo.py"),
            "--out",
            str(out),
            "--docs",
            "1500",
            "--pretrain-steps",
            "100",
            "--uptrain-steps",
            "30",
        ],
        env=env,
        cwd=ROOT,  # as `make demo` runs it
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {}
    for line in (out / "results.md").read_text().splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells
    assert rows["base"][1] == "MHA" and rows["converted"][1] == "MLKV-2" and rows["uptrained"][1] == "MLKV-2"
    assert int(rows["converted"][2]) == 2 and int(rows["base"][2]) == 48
    base, converted, uptrained = (float(rows[k][4]) for k in ("base", "converted", "uptrained"))
    assert uptrained < converted  # uptraining recovers what the conversion lost
    assert (out / "run" / "tensorboard").is_dir() and (out / "run" / "hf" / "step_30" / "config.json").is_file()
