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


def test_benchmark_results_are_the_ones_the_docs_cite():
    """benchmarks/results holds only what a page or the code cites (no lab notebook), and every result
    benchmarks/README.md names exists."""
    import re

    results = ROOT / "benchmarks" / "results"
    kept = [p for p in results.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    citing = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "benchmarks" / "README.md"]
    citing += [p for p in ROOT.glob("**/*.py") if ".venv" not in p.parts and results not in p.parents]
    citing += list((ROOT / "benchmarks" / "uptrain_study").glob("*.sh"))
    text = "\n".join(p.read_text(errors="ignore") for p in citing)
    assert [p.relative_to(ROOT) for p in kept if p.name not in text] == []
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    named = set(re.findall(r"results/[\w./-]+\.(?:json|md|png|txt)", readme))
    assert named and [n for n in named if not (ROOT / "benchmarks" / n).is_file()] == []
