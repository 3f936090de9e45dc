"""The checkout's own rules: what the README's workflow writes inside it stays out of git and of the
linter (DeepSpeed copies its own scripts, which are not ours to lint, into run folders)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_workflows_output_folders_are_ignored_by_git_and_ruff(tmp_path):
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent))
    if ruff is None:
        pytest.skip("ruff is not installed beside this Python")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    for name in ("pyproject.toml", ".gitignore"):
        shutil.copy(ROOT / name, tmp_path / name)
    written = ["data/pile.json", "ckpt/mlkv-6/model.py", "runs/mlkv-6/checkpoints/zero_to_fp32.py", "eval/a.json"]
    written += ["report/pythia-160m.md", "bench/pythia-160m/results.json", "demo_out/run/metrics.jsonl"]
    ours = "megatron_mlkv/data/unused_import.py"  # a package folder named like one of them stays linted
    for name in [*written, ours]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("import os\n")  # F401 wherever ruff looks
    ignored = subprocess.run(["git", "check-ignore", *written, ours], cwd=tmp_path, capture_output=True, text=True)
    assert ignored.stdout.split() == written
    lint = subprocess.run(
        [ruff, "check", "--output-format", "concise", "."], cwd=tmp_path, capture_output=True, text=True
    )
    assert [line.split(":")[0] for line in lint.stdout.splitlines() if ":" in line] == [ours]
