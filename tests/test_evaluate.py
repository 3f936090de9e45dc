"""Evaluation (launch/evaluate.py, megatron_mlkv/evaluation/harness.py) and the report (launch/report.py).

Offline: a tokenizer trained here, a tiny GPT-NeoX converted to MLKV-2 (m=2, g=1), and two local
lm-eval tasks (multiple choice, and a lambada-like loglikelihood task) reading jsonl files written here.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

from megatron_mlkv.conversion import convert_checkpoint
from megatron_mlkv.evaluation.harness import eval_scalars, try_evaluate_checkpoint
from megatron_mlkv.evaluation.report import ReportError, build_report, pareto_front, point_labels

pytestmark = pytest.mark.compat  # lm-eval: also run by `make test-compat`

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TASKS = ["tiny_mc", "tiny_lambada"]
LIMIT, BATCH = 8, 4
ANIMALS = ["cat", "dog", "fox", "owl", "horse", "goat"]

MC_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
LAMBADA_YAML = """task: tiny_lambada
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{text.split(' ')[:-1] | join(' ')}}}}"
doc_to_target: "{{{{' ' + text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_tasks(folder: Path) -> Path:
    """Two lm-eval task YAMLs over jsonl files, in the style of the demo corpus."""
    rng = random.Random(0)
    folder.mkdir(parents=True)
    mc, lam = [], []
    for _ in range(12):
        animal = rng.choice(ANIMALS)
        choices = [animal] + rng.sample([a for a in ANIMALS if a != animal], 2)
        rng.shuffle(choices)
        mc.append(
            {
                "question": f"Ada sees a small {animal} near the garden. Ada feeds the",
                "choices": [" " + c for c in choices],
                "label": choices.index(animal),
            }
        )
        lam.append({"text": f"Yesterday Bruno saw the {animal} at the river. Bruno follows the {animal}"})
    for name, docs, yaml in (("tiny_mc", mc, MC_YAML), ("tiny_lambada", lam, LAMBADA_YAML)):
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (folder / f"{name}.yaml").write_text(yaml.format(data=data))
    return folder


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tokenizer_dir):
    """A converted MLKV-2 checkpoint (with tokenizer) and a folder of local tasks."""
    root = tmp_path_factory.mktemp("evaluate")
    tok_dir = tokenizer_dir
    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    base = GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=128,
            bos_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    convert_checkpoint(str(root / "base"), root / "mlkv-2", kv_layers=2, kv_groups=1, progress=False)
    return {"root": root, "model": root / "mlkv-2", "tasks": write_tasks(root / "tasks")}


@pytest.fixture
def offline(monkeypatch):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)


def run_cli(script: str, *args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **OFFLINE, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, str(ROOT / "launch" / script), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_cli_matches_lm_eval_hf_loader(workspace, offline, dtype):
    """launch/evaluate.py gives lm-eval's own `--model hf` numbers on a converted MLKV checkpoint (float32),
    in its own dtype (lm-eval's default) and in another one."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = workspace["root"] / f"eval-{dtype}" / "mlkv-2.json"
    proc = run_cli(
        "evaluate.py",
        "--model",
        workspace["model"],
        "--tasks",
        ",".join(TASKS),
        "--include-path",
        workspace["tasks"],
        "--limit",
        LIMIT,
        "--batch-size",
        BATCH,
        *(["--dtype", dtype] if dtype != "auto" else []),
        "--out",
        out,
        cwd=workspace["root"],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| tiny_mc | acc |" in proc.stdout and "MLKV-2" in proc.stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["mlkv-2.json"]  # no temporary left behind
    ours = json.loads(out.read_text())
    assert ours["config"]["dtype"] == ("float32" if dtype == "auto" else dtype)

    model_args = f"pretrained={workspace['model']},trust_remote_code=True,dtype={dtype}"
    ref = lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=TASKS,
        task_manager=TaskManager(include_path=str(workspace["tasks"])),
        limit=LIMIT,
        batch_size=BATCH,
        device="cpu",
        log_samples=False,
    )
    for task in TASKS:
        metrics = {k: v for k, v in ref["results"][task].items() if "," in k and "_stderr" not in k}
        assert set(metrics) <= set(ours["results"][task])
        for key, value in metrics.items():
            assert ours["results"][task][key] == value, (task, key)
    assert set(ref["results"]["tiny_mc"]) >= {"acc,none", "acc_norm,none"}
    assert set(ref["results"]["tiny_lambada"]) >= {"perplexity,none", "acc,none"}
    assert ours["n-samples"]["tiny_mc"]["effective"] == LIMIT

    layout = ours["layout"]
    assert (layout["name"], layout["kv_layers"], layout["num_kv_heads"], layout["kv_owner"]) == (
        "MLKV-2",
        2,
        1,
        [0, 0, 2, 2],
    )
    assert ours["kv_bytes_per_token"] == 2 * 2 * 1 * 8 * 2  # K and V, m*g heads, head_dim 8, fp16
    assert set(eval_scalars(ours)) == {
        "eval/tiny_mc/acc",
        "eval/tiny_mc/acc_norm",
        "eval/tiny_lambada/perplexity",
        "eval/tiny_lambada/acc",
    }


def test_eval_scalars_names():
    result = {
        "results": {
            "arc_easy": {
                "alias": "arc_easy",
                "name": "arc_easy",
                "sample_len": 10,
                "acc,none": 0.5,
                "acc_stderr,none": 0.1,
                "acc_norm,none": 0.25,
                "acc_norm_stderr,none": "N/A",
            },
            "lambada_openai": {
                "alias": "lambada_openai",
                "perplexity,none": 12.5,
                "perplexity_stderr,none": 1.0,
                "acc,none": 1,
            },
            "gsm8k": {
                "exact_match,strict-match": 0.125,
                "exact_match_stderr,strict-match": 0.01,
                "exact_match,flexible-extract": "N/A",
            },
        }
    }
    assert eval_scalars(result) == {
        "eval/arc_easy/acc": 0.5,
        "eval/arc_easy/acc_norm": 0.25,
        "eval/lambada_openai/perplexity": 12.5,
        "eval/lambada_openai/acc": 1.0,
        "eval/gsm8k/exact_match_strict-match": 0.125,
    }


def test_failures_are_reported_not_raised(workspace, offline, tmp_path):
    """An unknown task, and a task whose data is missing (as offline downloads are), give a reason."""
    out = tmp_path / "eval" / "step_1.json"
    result, error = try_evaluate_checkpoint(
        str(workspace["model"]),
        ["tiny_mc", "no_such_task"],
        include_path=str(workspace["tasks"]),
        limit=2,
        out_path=str(out),
    )
    assert result is None and "unknown task 'no_such_task'" in error and "\n" not in error

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tiny_broken.yaml").write_text(
        MC_YAML.replace("task: tiny_mc", "task: tiny_broken").format(data=tmp_path / "missing.jsonl")
    )
    rng = (random.getstate(), torch.get_rng_state())
    result, error = try_evaluate_checkpoint(
        str(workspace["model"]), "tiny_broken", include_path=str(broken), limit=2, out_path=str(out), device="cpu"
    )
    assert result is None and "missing.jsonl" in error and "\n" not in error
    assert random.getstate() == rng[0] and torch.equal(torch.get_rng_state(), rng[1])  # lm-eval reseeds: restored
    assert not out.exists()

    result, error = try_evaluate_checkpoint(str(tmp_path / "no_model"), ["tiny_mc"])
    assert result is None and "does not exist" in error


def test_cli_bad_input_is_one_line(tmp_path):
    proc = run_cli("evaluate.py", "--model", tmp_path / "missing", "--out", tmp_path / "e.json")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "e.json").exists()


# ------------------------------------------------------------------ report


def eval_json(path: Path, name: str, m: int, g: int, accs: dict, step=None, limit=None) -> Path:
    """A synthetic evaluation JSON of a 12-layer, 12-head, head_dim 64 model (`limit`: lm-eval's)."""
    result = {
        "config": {"limit": limit},
        "model": f"/ckpt/{name.lower()}",
        "step": step,
        "tasks": list(accs),
        "layout": {
            "name": name,
            "num_layers": 12,
            "num_heads": 12,
            "kv_layers": m,
            "num_kv_heads": g,
            "kv_owner": list(range(12)),
            "kv_heads_total": m * g,
        },
        "kv_dtype": "fp16",
        "kv_bytes_per_token": 2 * m * g * 64 * 2,
        "results": {t: {"alias": t, "acc,none": a, "acc_stderr,none": 0.01} for t, a in accs.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return path


def test_pareto_front():
    points = [(100, 0.5), (50, 0.5), (50, 0.4), (10, 0.3), (10, 0.3), (200, 0.6), (5, None)]
    assert pareto_front(points) == [False, True, False, True, True, True, False]


def test_report_table_front_and_plot(tmp_path):
    mha = eval_json(tmp_path / "mha.json", "MHA", 12, 12, {"arc_easy": 0.60, "piqa": 0.70})
    gqa = eval_json(tmp_path / "gqa.json", "GQA-48", 12, 4, {"arc_easy": 0.58, "piqa": 0.66})
    mlkv48 = eval_json(tmp_path / "mlkv48.json", "MLKV-48", 4, 12, {"arc_easy": 0.50, "piqa": 0.60})
    run = tmp_path / "runs" / "mlkv-2"  # a run folder: its latest evaluation counts
    eval_json(run / "eval" / "step_5.json", "MLKV-2", 2, 1, {"arc_easy": 0.10, "piqa": 0.10}, step=5)
    eval_json(run / "eval" / "step_10.json", "MLKV-2", 2, 1, {"arc_easy": 0.40, "piqa": 0.50}, step=10)

    prefix = tmp_path / "out" / "table3"
    proc = run_cli("report.py", mlkv48, run, mha, gqa, "--out", prefix)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(prefix.with_suffix(".json").read_text())
    rows = {r["layout"]: r for r in report["rows"]}
    assert [r["layout"] for r in report["rows"]] == ["MHA", "GQA-48", "MLKV-48", "MLKV-2"]  # most KV first
    assert {k: r["average"] for k, r in rows.items()} == pytest.approx(
        {"MHA": 0.65, "GQA-48": 0.62, "MLKV-48": 0.55, "MLKV-2": 0.45}
    )
    assert {k for k, r in rows.items() if r["pareto"]} == {"MHA", "GQA-48", "MLKV-2"}  # MLKV-48 loses to GQA-48
    assert rows["MLKV-2"]["label"] == "mlkv-2 @ step 10" and rows["MLKV-2"]["kv_bytes_per_token"] == 512

    table = prefix.with_suffix(".md").read_text()
    assert table.strip() in proc.stdout
    assert "| mha | MHA | 144 | 36,864 | 0.6000 | 0.7000 | 0.6500 | * |" in table
    assert "| mlkv-48 | MLKV-48 | 48 | 12,288 | 0.5000 | 0.6000 | 0.5500 |  |" in table
    assert prefix.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_tells_runs_of_one_name_apart_and_flags_limited_evaluations(tmp_path):
    """Two studies' runs of one name read alike as 'mlkv-6 @ step 8'; each gets its folder. A run
    evaluated on a few documents a task (--eval-limit) says so in its row."""
    for study, limit in (("study1", None), ("study2", 20)):
        eval_json(tmp_path / study / "mlkv-6" / "eval" / "step_8.json", "MLKV-6", 6, 1, {"piqa": 0.5}, 8, limit)
    report = build_report([tmp_path / "study1" / "mlkv-6", tmp_path / "study2" / "mlkv-6"], tmp_path / "r")
    assert [r["label"] for r in report["rows"]] == ["study1/mlkv-6 @ step 8", "study2/mlkv-6 @ step 8"]
    assert (
        "| study2/mlkv-6 @ step 8 (limit 20) |" in report["table"] and "| study1/mlkv-6 @ step 8 |" in report["table"]
    )
    assert "(limit N): evaluated on at most N documents a task" in report["table"]


def test_plot_names_ablations_of_one_layout_by_run():
    rows = [
        {"layout": "MHA", "label": "mha @ step 8"},
        {"layout": "MLKV-6", "label": "mlkv-6 @ step 8"},
        {"layout": "MLKV-6", "label": "mlkv-6-scratch @ step 8"},
        {"layout": "MLKV-1", "label": "x.json"},
    ]
    assert point_labels(rows) == ["MHA", "mlkv-6", "mlkv-6-scratch", "MLKV-1"]


def test_report_bad_source(tmp_path):
    (tmp_path / "empty_run").mkdir()
    proc = run_cli("report.py", tmp_path / "empty_run", "--out", tmp_path / "r")
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "eval/step_N.json" in proc.stderr
    with pytest.raises(ReportError, match="does not exist"):
        build_report([tmp_path / "nope.json"], tmp_path / "r")
    (tmp_path / "bad.json").write_text('{"results": {}}')
    with pytest.raises(ReportError, match="lacks layout, kv_bytes_per_token"):
        build_report([tmp_path / "bad.json"], tmp_path / "r")
    assert not list(tmp_path.glob("r*"))
