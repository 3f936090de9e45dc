"""The uptraining study's own steps (benchmarks/uptrain_study/steps.py): the corpus of installed sources, the
next-line task, the sweep's choice and the budget curve. The pipeline itself is the user commands, tested in
their own files."""

import json
import random

import pytest

from benchmarks.uptrain_study import steps
from benchmarks.uptrain_study.steps import build_corpus, next_line_docs, write_next_line_task


def write_tree(root, seed=0):
    """site-packages-like folders: packages of several files, a duplicate, a huge and a binary file."""
    rng = random.Random(seed)
    for p in range(12):
        pkg = root / f"pkg{p}"
        pkg.mkdir(parents=True)
        for f in range(3):
            lines = [f"def f_{p}_{f}_{i}(x):\n    return x * {rng.randint(0, 99)} + {i}  # line {i}" for i in range(40)]
            (pkg / f"m{f}.py").write_text("\n".join(lines) + "\n")
    (root / "pkg0" / "copy.py").write_text((root / "pkg1" / "m0.py").read_text())  # same content twice
    (root / "pkg2" / "huge.py").write_text("x = 1\n" * 300_000)
    (root / "pkg3" / "binary.py").write_bytes(b"\xff\xfe" * 200)
    (root / "single.py").write_text("import os\n" * 50)


def test_corpus_splits_by_package_and_drops_duplicates(tmp_path):
    write_tree(tmp_path / "site-packages")
    stats = build_corpus(tmp_path / "out", roots=[tmp_path / "site-packages"], valid_share=0.2)
    splits = {
        name: [json.loads(line) for line in open(tmp_path / "out" / f"{name}.jsonl")] for name in ("train", "valid")
    }
    packages = {name: {d["package"] for d in docs} for name, docs in splits.items()}
    assert packages["train"] and packages["valid"] and not packages["train"] & packages["valid"]
    texts = [d["text"] for docs in splits.values() for d in docs]
    assert len(texts) == len(set(texts)) == stats["distinct_files"] == 12 * 3 + 1  # the copy, huge and binary out
    assert not any(d["path"].endswith(("huge.py", "binary.py")) for docs in splits.values() for d in docs)
    share = stats["characters"]["valid"] / sum(stats["characters"].values())
    assert 0.2 <= share < 0.4
    again = build_corpus(tmp_path / "again", roots=[tmp_path / "site-packages"], valid_share=0.2)
    assert (
        again == {**stats}
        and (tmp_path / "again" / "train.jsonl").read_text() == (tmp_path / "out" / "train.jsonl").read_text()
    )


def test_next_line_questions_ask_for_the_true_next_line(tmp_path):
    write_tree(tmp_path / "src")
    build_corpus(tmp_path / "out", roots=[tmp_path / "src"], valid_share=0.3)
    docs = next_line_docs(tmp_path / "out" / "valid.jsonl", n=30, context_lines=5)
    files = [json.loads(line)["text"] for line in open(tmp_path / "out" / "valid.jsonl")]
    for doc in docs:
        target = doc["choices"][doc["label"]]
        assert len(doc["choices"]) == len(set(doc["choices"])) == 4
        assert doc["context"].endswith("\n") and doc["context"].count("\n") == 5
        # the context followed by the answer is a run of lines of one held-out file
        assert any(doc["context"] + target + "\n" in text for text in files)
        assert not any(
            doc["context"] + other + "\n" in text for text in files for other in doc["choices"] if other != target
        )
    with pytest.raises(ValueError, match="only"):
        next_line_docs(tmp_path / "out" / "valid.jsonl", n=10**6)
    task = write_next_line_task(tmp_path / "out" / "valid.jsonl", tmp_path / "tasks", n=10)
    assert 'target_delimiter: ""' in (task / "next_line.yaml").read_text()
    assert len((task / "next_line.jsonl").read_text().splitlines()) == 10


def _run(name, layout="MLKV-6", acc=0.4, loss=3.0, weight=None, temperature=None, tokens=100, kv_heads=6):
    recipe = "plain" if weight is None else f"distilled (A={weight:g}, T={temperature:g})"
    return dict(
        run=name,
        layout=layout,
        recipe=recipe,
        acc=acc,
        acc_norm=acc,
        loss_converted=6.0,
        loss_uptrained=loss,
        kl_to_base=0.5,
        kv_heads=kv_heads,
        kv_bytes_per_token_fp16=768,
        distill_weight=weight,
        distill_temperature=temperature,
        uptrain_tokens=tokens,
        budget_percent=steps.budget_percent(name),
    )


def test_the_budget_curve_takes_the_sweep_run_of_the_chosen_a_and_t(tmp_path):
    runs = [
        _run("mha", "MHA", acc=0.7, kv_heads=144),
        _run("mlkv-6", tokens=100),
        _run("mlkv-6-tokens10", tokens=200),
        _run("mlkv-6-kd-a0.5-t2", weight=0.5, temperature=2.0, tokens=100),
        _run("mlkv-6-kd-a1.0-t1", weight=1.0, temperature=1.0, tokens=100, acc=None),
        _run("mlkv-6-kd-tokens10", weight=1.0, temperature=1.0, tokens=200),
        _run("mlkv-6-sequential"),
    ]
    results = {"base": {}, "runs": runs, "stage_seconds": {}}
    curve = steps.budget_curve(results)
    assert [r["run"] for r in curve["plain"]] == ["mlkv-6", "mlkv-6-tokens10"]
    assert [r["run"] for r in curve["distilled"]] == ["mlkv-6-kd-a1.0-t1", "mlkv-6-kd-tokens10"]
    assert steps.budget_percent("mlkv-6-kd-tokens2.5") == 2.5 and steps.budget_percent("gqa-48-kd") == 5.0
    assert steps.plot_budget(tmp_path, results).is_file()  # an accuracy that failed is left out of the plot
    table = steps.format_results({**results, "base": BASE}).split("MLKV-6 by token budget:")[1].splitlines()[4:8]
    assert table == [  # accuracy as a share of the MHA control's (0.7); none where the evaluation failed
        "| 5 | plain | 100 | 3.0000 | 0.5000 | 0.400 | 57% |",
        "| 10 | plain | 200 | 3.0000 | 0.5000 | 0.400 | 57% |",
        "| 5 | distilled | 100 | 3.0000 | 0.5000 |  |  |",
        "| 10 | distilled | 200 | 3.0000 | 0.5000 | 0.400 | 57% |",
    ]


def test_the_loss_curves_compare_cross_entropy_also_of_distilled_runs(tmp_path):
    records = [{"step": 1, "loss": 2.0, "ce": 5.0, "kl": 2.0}, {"step": 2, "valid_loss": 4.0}, {"step": 3, "loss": 3.0}]
    assert steps.train_curve(records) == [(1, 5.0), (3, 3.0)]  # a distilled step's CE; validation lines skipped
    runs = [
        {**_run("mha", "MHA", kv_heads=144), "train_loss": [(1, 3.0), (2, 2.5)]},
        {**_run("mlkv-6-kd", weight=1.0, temperature=1.0), "train_loss": [(1, 6.0), (2, 5.0)]},
    ]
    for r in runs:
        r.update(init="converted", merge="mean", mlp_init="zero")
    # no base/pretrain.jsonl (a results folder copied without it): the uptraining panel alone
    assert steps.plot_curves(tmp_path, {"base": BASE, "runs": runs, "stage_seconds": {}}).is_file()


BASE = dict(layers=12, heads=12, hidden=384, parameters=1, tokens=1000, tokens_per_s=1.0, valid_loss=2.0)


def test_the_sweep_chooses_the_lowest_final_validation_loss(tmp_path):
    for (a, t), losses in {("0.5", "1"): [4.0, 3.5], ("1.0", "1"): [4.2, 3.4], ("1.0", "2"): [3.0, 3.6]}.items():
        run = tmp_path / "runs" / steps.sweep_run(a, t)
        run.mkdir(parents=True)
        lines = [{"step": 1, "loss": 9.0}] + [{"step": 10 * (i + 1), "valid_loss": v} for i, v in enumerate(losses)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert steps.best_sweep(tmp_path, ["0.5:1", "1.0:1", "1.0:2"]) == "1.0:1"  # the last validation, not the best
