"""The uptraining study's own steps (benchmarks/uptrain_study/steps.py): the corpus of installed sources and the
next-line task. The pipeline itself is the user commands, tested in their own files."""

import json
import random

import pytest

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
