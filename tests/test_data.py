"""megatron_mlkv.data and data_tools/pack_pile.py on local corpora and locally trained tokenizers."""

import json
import pickle
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
from helpers import overwrite_bytes

from megatron_mlkv import data
from megatron_mlkv.data import DataError, PackedDataset, RowSampler, collate, pack, rank_slice
from megatron_mlkv.data.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
EOD = "<|endoftext|>"
WORDS = "the a cat dog sees runs near river market quiet brave counts plus makes über café 42 7 , .".split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Texts with a long-tailed length distribution (some longer than the rows used here), no newlines."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(max(1, int(rng.lognormvariate(2.5, 1.0))))) for _ in range(n)]


def write_jsonl(path: Path, texts, key: str = "text") -> Path:
    path.write_text("".join(json.dumps({key: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A corpus of 150 documents as .jsonl and a byte-level BPE tokenizer trained on it."""
    tmp = tmp_path_factory.mktemp("data")
    docs = make_docs(150)
    corpus = write_jsonl(tmp / "corpus.jsonl", docs)
    tok_dir = train_tokenizer(corpus, tmp / "tok", vocab_size=300)
    from tokenizers import Tokenizer

    rust = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    eod = rust.token_to_id(EOD)
    expected = [rust.encode(t, add_special_tokens=False).ids + [eod] for t in docs]
    return {"tmp": tmp, "docs": docs, "corpus": corpus, "tok": tok_dir, "eod": eod, "expected": expected}


def pieces_of(ds: PackedDataset) -> list[tuple]:
    """Every document piece in the rows, read back through loss_mask and doc_boundaries."""
    out = []
    for i in range(len(ds)):
        row, n = ds[i], int(ds.loss_mask(i).sum())
        assert row.shape == (ds.seq_len,) and ds.loss_mask(i)[:n].all()  # real tokens first, then padding
        assert (row[n:] == ds.pad_id).all()
        starts = list(ds.doc_boundaries(i)) + [n]
        assert starts[0] == 0 and all(a < b for a, b in zip(starts, starts[1:]))
        out += [tuple(int(t) for t in row[a:b]) for a, b in zip(starts, starts[1:])]
    return out


def chunks(ids: list[int], size: int) -> list[tuple]:
    return [tuple(ids[i : i + size]) for i in range(0, len(ids), size)]


def assert_round_trip(ds: PackedDataset, expected: list[list[int]]) -> None:
    """Each document (EOD appended) appears exactly once: whole when it fits a row, else as row-sized
    pieces in order; nothing else is in the rows."""
    want = Counter(p for ids in expected for p in chunks(ids, ds.seq_len))
    assert Counter(pieces_of(ds)) == want
    assert int(sum(ds.loss_mask(i).sum() for i in range(len(ds)))) == sum(map(len, expected))


def bytes_of(prefix: Path) -> tuple[bytes, bytes]:
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


# --------------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------------


def test_best_fit_round_trip(work, tmp_path):
    meta = pack([str(work["corpus"])], str(work["tok"]), 64, str(tmp_path / "p"), progress=False)
    ds = PackedDataset(tmp_path / "p")
    assert_round_trip(ds, work["expected"])
    assert len(ds) == meta["rows"] == ds.num_rows and ds.seq_len == 64
    assert ds[0].dtype == np.uint16 and meta["dtype"] == "uint16"  # vocabulary of 300 fits uint16
    assert Path(f"{tmp_path / 'p'}.bin").stat().st_size == len(ds) * 64 * 2
    assert ds.eod_id == ds.pad_id == work["eod"] and ds.vocab_size == 300
    assert ds.max_token_id == max(max(ids) for ids in work["expected"])
    real = sum(map(len, work["expected"]))
    assert meta["documents"] == 150 and meta["document_tokens"] == meta["kept_tokens"] == real
    assert meta["fill_ratio"] == pytest.approx(real / (len(ds) * 64)) and meta["truncated_tokens"] == 0
    assert meta["split_documents"] == sum(len(ids) > 64 for ids in work["expected"]) > 0
    assert meta["tokenizer"] == str(work["tok"]) and meta["sources"] == [str(work["corpus"])]


def test_best_fit_never_splits_a_fitting_document_and_fills_over_99_percent():
    rng = np.random.default_rng(0)
    seq_len = 2048  # Pile-like document lengths: lognormal, mean ~1500 tokens, a long tail past the row
    lengths = np.maximum(1, rng.lognormal(np.log(1540) - 1.5**2 / 2, 1.5, 20_000).astype(int))
    docs = [np.full(n, i, dtype=np.uint32) for i, n in enumerate(lengths)]  # token = document number
    rows, stats = [], {"split_documents": 0}
    data.pack_best_fit(iter(docs), seq_len, lambda row: rows.append(row), stats, window=5000)
    used = [sum(map(len, row)) for row in rows]
    assert max(used) <= seq_len
    assert sum(used) == lengths.sum() and sum(used) / (len(rows) * seq_len) > 0.99
    where = {}  # document -> rows holding a piece of it
    for r, row in enumerate(rows):
        for piece in row:
            assert (piece == piece[0]).all()
            where.setdefault(int(piece[0]), []).append(r)
    for i, n in enumerate(lengths):
        assert len(where[i]) == -(-n // seq_len)  # one row when it fits, else ceil(n / seq_len) pieces
    assert stats["split_documents"] == int((lengths > seq_len).sum())


def naive_best_fit_decreasing(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Best-fit decreasing by brute force: longest first, into the open row with the least room left
    that holds it (the earliest such row on a tie), else a new row."""
    rows = []
    for n in sorted(lengths, reverse=True):
        room = [seq_len - sum(row) for row in rows]
        fits = [r for r in range(len(rows)) if room[r] >= n]
        if fits:
            rows[min(fits, key=lambda r: (room[r], r))].append(n)
        else:
            rows.append([n])
    return rows


def test_best_fit_puts_each_piece_in_the_tightest_open_row():
    def packed_lengths(lengths, seq_len):
        rows = []
        data.pack_best_fit((np.zeros(n, np.uint32) for n in lengths), seq_len, rows.append, {"split_documents": 0})
        return [[len(p) for p in row] for row in rows]

    assert packed_lengths([3, 6, 4, 5], 10) == [[6, 4], [5, 3]]  # worst fit would give [[6, 3], [5, 4]]
    lengths = random.Random(0).choices(range(1, 51), k=300)
    assert packed_lengths(lengths, 50) == naive_best_fit_decreasing(lengths, 50)


def reference_packing(docs: list[list[int]], eod: int, seq_len: int, chunk: int) -> list[list[int]]:
    """The reference implementation, written out: truncate (to seq_len - 1 here so the EOD fits),
    sort each chunk of documents by length, greedily fill rows, flush at the end of every chunk."""
    rows = []
    truncated = [ids[: seq_len - 1] for ids in docs]
    for start in range(0, len(truncated), chunk):
        buffer = []
        for ids in sorted(truncated[start : start + chunk], key=len):
            with_eos = ids + [eod]
            if len(buffer) + len(with_eos) <= seq_len:
                buffer.extend(with_eos)
            else:
                rows.append(buffer)
                buffer = with_eos
        rows.append(buffer)
    return [row + [eod] * (seq_len - len(row)) for row in rows]


def test_reference_packing_reproduces_the_reference_algorithm(work, tmp_path, monkeypatch):
    monkeypatch.setattr(data.pipeline, "REFERENCE_CHUNK", 40)  # several chunks in a small corpus
    seq_len = 48
    meta = pack(
        [str(work["corpus"])], str(work["tok"]), seq_len, str(tmp_path / "r"), packing="reference", progress=False
    )
    ds = PackedDataset(tmp_path / "r")
    texts = [ids[:-1] for ids in work["expected"]]
    want = reference_packing(texts, work["eod"], seq_len, chunk=40)
    assert [list(map(int, ds[i])) for i in range(len(ds))] == want
    long_docs = [ids for ids in texts if len(ids) >= seq_len]
    assert long_docs  # truncated to seq_len - 1 tokens + EOD: a full row, not one token too long
    assert meta["truncated_tokens"] == sum(len(ids) - (seq_len - 1) for ids in long_docs)
    assert meta["split_documents"] == 0
    for ids in long_docs:
        row = next(i for i in range(len(ds)) if list(map(int, ds[i])) == ids[: seq_len - 1] + [work["eod"]])
        assert ds.loss_mask(row).all() and list(ds.doc_boundaries(row)) == [0]


def test_max_doc_tokens_keeps_the_end_of_document_token(work, tmp_path):
    meta = pack([str(work["corpus"])], str(work["tok"]), 64, str(tmp_path / "m"), max_doc_tokens=30, progress=False)
    ds = PackedDataset(tmp_path / "m")
    cut = [ids if len(ids) <= 30 else ids[:29] + [ids[-1]] for ids in work["expected"]]
    assert_round_trip(ds, cut)
    assert meta["truncated_tokens"] == sum(max(0, len(ids) - 30) for ids in work["expected"]) > 0


def test_uint32_when_the_vocabulary_does_not_fit_uint16(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70_000)} | {EOD: 70_000}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    corpus = write_jsonl(tmp_path / "c.jsonl", ["w65536 w69999 w3", "w70 w65535", "w1"])
    meta = pack([str(corpus)], str(tmp_path / "tokenizer.json"), 8, str(tmp_path / "u"), progress=False)
    ds = PackedDataset(tmp_path / "u")
    assert meta["dtype"] == "uint32" and ds[0].dtype == np.uint32 and ds.vocab_size == 70_001
    assert_round_trip(ds, [[65536, 69999, 3, 70_000], [70, 65535, 70_000], [1, 70_000]])
    assert ds.max_token_id == 70_000


def test_num_docs_fraction_and_workers_are_deterministic(work, tmp_path):
    corpus, tok = str(work["corpus"]), str(work["tok"])
    pack([corpus], tok, 64, str(tmp_path / "n"), num_docs=20, progress=False)
    assert_round_trip(PackedDataset(tmp_path / "n"), work["expected"][:20])  # the first 20, in source order

    rng = random.Random(7)
    sample = [ids for ids in work["expected"] if rng.random() < 0.3]  # a Bernoulli draw per document
    pack([corpus], tok, 64, str(tmp_path / "f1"), fraction=0.3, seed=7, progress=False)
    pack([corpus], tok, 64, str(tmp_path / "f2"), fraction=0.3, seed=7, workers=2, progress=False)
    pack([corpus], tok, 64, str(tmp_path / "f3"), fraction=0.3, seed=8, progress=False)
    assert_round_trip(PackedDataset(tmp_path / "f1"), sample)
    kept = PackedDataset(tmp_path / "f1").meta["documents"]  # Binomial(150, 0.3): 45 ± 5.6
    assert kept == len(sample) and abs(kept - 0.3 * 150) < 4 * (150 * 0.3 * 0.7) ** 0.5
    assert bytes_of(tmp_path / "f1") == bytes_of(tmp_path / "f2")  # the same for any number of workers
    assert bytes_of(tmp_path / "f1") != bytes_of(tmp_path / "f3")
    pack([corpus], tok, 64, str(tmp_path / "fn"), fraction=0.3, seed=7, num_docs=5, progress=False)
    assert_round_trip(PackedDataset(tmp_path / "fn"), sample[:5])


def test_every_input_format_gives_the_same_rows(work, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs, tok = work["docs"], str(work["tok"])
    src = tmp_path / "src"
    src.mkdir()
    (src / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(work["corpus"].read_bytes()))
    (src / "c.json").write_text(json.dumps([{"text": t} for t in docs]))
    pq.write_table(pa.table({"text": docs}), src / "c.parquet")
    (src / "c.txt").write_text("\n\n".join(docs) + "\n")  # one document per line; blank lines skipped
    write_jsonl(src / "content.jsonl", docs, key="content")
    parts = tmp_path / "parts"
    parts.mkdir()
    for k in range(3):  # 'part-1' sorts before 'part-2': the glob keeps source order
        write_jsonl(parts / f"part-{k}.jsonl", docs[k * 50 : (k + 1) * 50])

    docs_and_blanks = [x for i, t in enumerate(docs) for x in ([t, "", "  \n "] if i % 40 == 0 else [t])]
    write_jsonl(src / "blanks.jsonl", docs_and_blanks)  # blank documents are skipped, and counted

    pack([str(work["corpus"])], tok, 64, str(tmp_path / "base"), progress=False)
    base = bytes_of(tmp_path / "base")
    meta = pack([str(src / "blanks.jsonl")], tok, 64, str(tmp_path / "blanks"), num_docs=len(docs), progress=False)
    assert bytes_of(tmp_path / "blanks") == base
    assert (meta["documents"], meta["empty_documents"]) == (len(docs), 8)
    cases = {
        "zst": [str(src / "c.jsonl.zst")],
        "json": [str(src / "c.json")],
        "parquet": [str(src / "c.parquet")],
        "txt": [str(src / "c.txt")],
        "glob": [str(parts / "part-*.jsonl")],
        "folder": [str(parts)],
        "list": [str(parts / f"part-{k}.jsonl") for k in range(3)],
    }
    for name, inputs in cases.items():
        meta = pack(inputs, tok, 64, str(tmp_path / name), progress=False)
        assert bytes_of(tmp_path / name) == base, name
        assert meta["documents"] == 150, name
    pack([str(src / "content.jsonl")], tok, 64, str(tmp_path / "key"), text_key="content", progress=False)
    assert bytes_of(tmp_path / "key") == base


def test_tokenizer_folder_json_and_sentencepiece(work, tmp_path):
    import sentencepiece as spm

    corpus = str(work["corpus"])
    pack([corpus], str(work["tok"]), 64, str(tmp_path / "folder"), progress=False)
    pack([corpus], str(work["tok"] / "tokenizer.json"), 64, str(tmp_path / "file"), progress=False)
    assert bytes_of(tmp_path / "folder") == bytes_of(tmp_path / "file")

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(work["docs"]),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=60,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    meta = pack([corpus], str(tmp_path / "sp.model"), 64, str(tmp_path / "spm"), progress=False)
    ds = PackedDataset(tmp_path / "spm")
    assert ds.eod_id == sp.eos_id() and meta["vocab_size"] == sp.get_piece_size()
    assert_round_trip(ds, [sp.encode(t) + [sp.eos_id()] for t in work["docs"]])


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def packed(work):
    prefix = work["tmp"] / "packed"
    pack([str(work["corpus"])], str(work["tok"]), 32, str(prefix), progress=False)
    return prefix


def test_rows_are_zero_copy_views_with_masks_and_boundaries(packed):
    ds = PackedDataset(packed)
    mm = ds._arrays()["tokens"]
    row = ds[3]
    assert isinstance(mm, np.memmap) and np.shares_memory(row, mm) and not row.flags.owndata
    assert not row.flags.writeable
    assert (ds[-1] == ds[len(ds) - 1]).all() and (ds[np.int64(2)] == ds[2]).all()
    with pytest.raises(IndexError):
        ds[len(ds)]
    eod = ds.eod_id
    for i in range(len(ds)):  # boundaries agree with the EOD tokens: a document starts after each one
        row, n = ds[i], int(ds.loss_mask(i).sum())
        after_eod = [0] + [j + 1 for j in range(n - 1) if row[j] == eod]
        assert list(ds.doc_boundaries(i)) == after_eod
        assert ds.loss_mask(i).dtype == bool and ds.doc_boundaries(i).dtype == np.int64

    batch = collate(ds, np.array([0, 5, 2]))
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
    assert batch["input_ids"].shape == batch["labels"].shape == (3, 32)
    for b, r in enumerate([0, 5, 2]):
        mask = torch.from_numpy(ds.loss_mask(r))
        assert (batch["input_ids"][b] == torch.from_numpy(ds[r].astype(np.int64))).all()
        assert (batch["labels"][b][mask] == batch["input_ids"][b][mask]).all()
        assert (batch["labels"][b][~mask] == -100).all()


def test_dataset_pickles_and_works_in_dataloader_workers(packed):
    ds = PackedDataset(packed)
    ds[0]  # maps opened in this process are not pickled
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._maps is None and (clone[1] == ds[1]).all()
    want = np.stack([ds[i] for i in range(len(ds))])
    for context in ("fork", "spawn"):  # spawn pickles the dataset into each worker
        loader = torch.utils.data.DataLoader(
            ds, batch_size=4, num_workers=2, collate_fn=np.stack, multiprocessing_context=context
        )
        assert (np.concatenate(list(loader)) == want).all()


def test_sampler_order_is_independent_of_ranks_and_resume():
    s = RowSampler(103, 8, seed=3)
    assert s.steps_per_pass == len(s) == 12  # 103 // 8; the 7 rows left over are skipped
    one_pass = np.concatenate(list(s))
    assert len(set(one_pass.tolist())) == 96 and one_pass.min() >= 0 and one_pass.max() < 103
    assert (one_pass[:8] == s.batch(0)).all() and not (one_pass == np.arange(96)).all()
    for step in range(30):  # two ranks see, together, the rows one rank sees, in the same order
        rows = s.batch(step)
        assert (np.concatenate([rank_slice(rows, r, 2) for r in range(2)]) == rows).all()
        assert (np.concatenate([rank_slice(rows, r, 4) for r in range(4)]) == rows).all()
        assert (RowSampler(103, 8, seed=3).batch(step) == rows).all()  # a fresh process agrees
    resumed = list(RowSampler(103, 8, seed=3, start_step=5))
    assert len(resumed) == 7 and all((a == s.batch(5 + k)).all() for k, a in enumerate(resumed))
    second_pass = np.concatenate([s.batch(k) for k in range(12, 24)])
    assert len(set(second_pass.tolist())) == 96 and not (second_pass == one_pass).all()

    assert (np.concatenate(list(RowSampler(20, 4))) == np.arange(20)).all()  # seed None: file order
    padded = RowSampler(10, 4, drop_last=False)
    assert padded.steps_per_pass == 3 and (padded.batch(2) == [8, 9, 0, 1]).all()
    assert len(list(RowSampler(20, 4, epochs=2))) == 10
    with pytest.raises(ValueError, match="dp_size 3"):
        rank_slice(s.batch(0), 0, 3)


# --------------------------------------------------------------------------------------------------
# Errors and atomicity
# --------------------------------------------------------------------------------------------------


def run_cli(*args) -> tuple[int, str, str]:
    """data_tools/pack_pile.py's main() in this process (the subprocess test below covers the real run)."""
    import contextlib
    import io

    from data_tools import pack_pile

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = pack_pile.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(result, *fragments) -> None:
    code, _, err = result
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, err


def test_cli_packs_and_reports(work, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "data_tools" / "pack_pile.py"),
            "--input",
            str(work["corpus"]),
            "--tokenizer",
            str(work["tok"]),
            "--seq-len",
            "64",
            "--out",
            str(tmp_path / "cli"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    for field in ("rows", "documents", "document tokens", "fill ratio", "truncated tokens"):
        assert f"| {field} |" in proc.stdout
    assert_round_trip(PackedDataset(tmp_path / "cli"), work["expected"])
    missing = subprocess.run(
        [
            sys.executable,
            str(ROOT / "data_tools" / "pack_pile.py"),
            "--input",
            str(tmp_path / "missing.jsonl"),
            "--tokenizer",
            str(work["tok"]),
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
    )
    assert_one_line_error((missing.returncode, missing.stdout, missing.stderr), "missing.jsonl", "no such file")
    assert "Traceback" not in missing.stderr
    # an existing prefix is refused (a run resuming on it would train on other rows) unless --overwrite
    before = bytes_of(tmp_path / "cli")
    again = [
        sys.executable,
        str(ROOT / "data_tools" / "pack_pile.py"),
        "--input",
        str(work["corpus"]),
        "--tokenizer",
        str(work["tok"]),
        "--seq-len",
        "32",
        "--out",
        str(tmp_path / "cli"),
        "--no-progress",
    ]
    refused = subprocess.run(again, capture_output=True, text=True)
    assert_one_line_error(
        (refused.returncode, refused.stdout, refused.stderr), f"{tmp_path / 'cli'}.bin", "already exist", "--overwrite"
    )
    assert bytes_of(tmp_path / "cli") == before
    assert subprocess.run(again + ["--overwrite"], capture_output=True, text=True).returncode == 0
    assert PackedDataset(tmp_path / "cli").seq_len == 32


def test_cli_errors_name_the_file_and_line(work, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    tok, out = work["tok"], tmp_path / "out"
    common = ("--tokenizer", tok, "--seq-len", 64, "--out", out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "also fine"}\n{"text": broken}\n')
    assert_one_line_error(run_cli("--input", bad, *common), f"{bad}:4:", "malformed JSON")
    nokey = tmp_path / "nokey.jsonl"
    nokey.write_text('{"text": "fine"}\n{"body": "no text here"}\n')
    assert_one_line_error(run_cli("--input", nokey, *common), f"{nokey}:2:", "'text'", "--text-key")
    number = tmp_path / "number.jsonl"
    number.write_text('{"text": "fine"}\n{"text": 5}\n')
    assert_one_line_error(run_cli("--input", number, *common), f"{number}:2:", "non-string")
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(zstandard.ZstdCompressor().compress(work["corpus"].read_bytes())[:500])
    assert_one_line_error(run_cli("--input", cut, *common), str(cut), "truncated")
    broken_json = tmp_path / "broken.json"
    broken_json.write_text('[{"text": "a"},\n {"text": "b"\n')
    assert_one_line_error(run_cli("--input", broken_json, *common), str(broken_json))
    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "body.parquet")
    assert_one_line_error(run_cli("--input", tmp_path / "body.parquet", *common), "body.parquet", "no column 'text'")
    assert_one_line_error(run_cli("--input", tmp_path / "nothing-*.jsonl", *common), "no file matches")
    assert_one_line_error(run_cli("--input", tmp_path / "data.csv", *common), "data.csv")
    assert_one_line_error(
        run_cli("--input", work["corpus"], "--tokenizer", tmp_path / "no.model", "--out", out),
        "no.model",
        "no such file",
    )
    assert_one_line_error(run_cli("--input", work["corpus"], *common, "--fraction", 1.5), "--fraction 1.5")
    assert not list(tmp_path.glob("out*"))  # nothing written by any failure


def test_a_line_that_is_not_utf8_or_an_unterminated_string_is_named_by_its_line(work, tmp_path):
    """Bytes that are not UTF-8 are reported by line (not by the byte offset in the file), and the
    message of an unterminated string reads as one sentence."""
    good = b'{"text": "fine"}\n' * 3
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(good + '{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=rf"^{latin}:4: not UTF-8 \(byte 14 of the line is 0xe9\)$"):
        pack([str(latin)], str(work["tok"]), 64, str(tmp_path / "out"), progress=False)
    open_string = tmp_path / "open.jsonl"
    open_string.write_bytes(good + b'{"text": "no end}\n')
    with pytest.raises(
        DataError, match=rf"^{open_string}:4: malformed JSON \(Unterminated string starting at: column 10\)$"
    ):
        pack([str(open_string)], str(work["tok"]), 64, str(tmp_path / "out"), progress=False)
    assert not list(tmp_path.glob("out*"))


def test_a_failure_leaves_nothing_that_looks_complete(work, tmp_path):
    lines = work["corpus"].read_text().splitlines()
    late = tmp_path / "late.jsonl"  # the error comes after many documents were packed
    late.write_text("\n".join(lines + ["{oops"]) + "\n")
    with pytest.raises(DataError, match=f"{late}:{len(lines) + 1}:"):
        pack([str(late)], str(work["tok"]), 64, str(tmp_path / "new"), progress=False)
    assert not list(tmp_path.glob("new*"))
    pack([str(work["corpus"])], str(work["tok"]), 64, str(tmp_path / "old"), progress=False)
    before = bytes_of(tmp_path / "old")
    with pytest.raises(DataError):
        pack([str(late)], str(work["tok"]), 64, str(tmp_path / "old"), progress=False, overwrite=True)
    assert bytes_of(tmp_path / "old") == before and len(PackedDataset(tmp_path / "old")) > 0  # the old pack stays
    assert sorted(p.name for p in tmp_path.glob("old*")) == ["old.bin", "old.idx", "old.json"]


def test_corrupt_or_truncated_packed_files_are_one_line_errors(packed, tmp_path):
    def copy(name):
        return copy_pack(packed, tmp_path / name)

    def error(prefix) -> str:
        with pytest.raises(DataError) as e:
            PackedDataset(prefix)
        assert "\n" not in str(e.value)
        return str(e.value)

    p = copy("bin")
    Path(f"{p}.bin").write_bytes(Path(f"{p}.bin").read_bytes()[:-10])
    assert f"{p}.bin" in error(p) and "truncated" in error(p)
    p = copy("idx")
    Path(f"{p}.idx").write_bytes(Path(f"{p}.idx").read_bytes()[:-4])
    assert f"{p}.idx" in error(p) and "truncated" in error(p)
    p = copy("magic")
    Path(f"{p}.idx").write_bytes(b"NOTMAGIC" + Path(f"{p}.idx").read_bytes()[8:])
    assert f"{p}.idx" in error(p) and "not a packed index" in error(p)
    p = copy("json")
    Path(f"{p}.json").write_text("{ not json")
    assert f"{p}.json" in error(p) and "corrupt" in error(p)
    p = copy("nojson")
    Path(f"{p}.json").unlink()
    assert f"{p}.json" in error(p) and "missing" in error(p)
    other = copy("other")
    meta = json.loads(Path(f"{other}.json").read_text())
    Path(f"{other}.json").write_text(json.dumps({**meta, "rows": meta["rows"] + 1}))
    assert "different packs" in error(other)


def copy_pack(src: Path, dst: Path) -> Path:
    import shutil

    for ext in ("bin", "idx", "json"):
        shutil.copy(f"{src}.{ext}", f"{dst}.{ext}")
    return dst


def test_the_fingerprint_finds_files_changed_after_packing(work, packed, tmp_path):
    ds = PackedDataset(packed)
    fingerprint = ds.verify()
    assert fingerprint == ds.meta["fingerprint"] and fingerprint["algorithm"] == "xxh3_128"
    for ext in ("bin", "idx"):  # the digest of the whole file, computed here in one call
        assert fingerprint[ext] == xxhash.xxh3_128(Path(f"{packed}.{ext}").read_bytes()).hexdigest()
    assert ds.meta["max_token_id"] == int(np.fromfile(f"{packed}.bin", ds.dtype).max())  # the true largest id
    # ten bytes of 0xff in the middle of .bin: sizes and header intact, so opening succeeds
    bad = copy_pack(packed, tmp_path / "bad_bin")
    overwrite_bytes(f"{bad}.bin", 40, b"\xff" * 10)
    ds = PackedDataset(bad)
    with pytest.raises(DataError, match=f"^{bad}.bin: its content does not match the fingerprint in {bad}.json"):
        ds.verify()
    # the same check for the index: one document boundary moved
    bad = copy_pack(packed, tmp_path / "bad_idx")
    size = Path(f"{bad}.idx").stat().st_size
    overwrite_bytes(f"{bad}.idx", size - 4, b"\x01\x00\x00\x00")
    with pytest.raises(DataError, match=f"^{bad}.idx: its content does not match"):
        PackedDataset(bad).verify()
    # a re-pack of other documents at the same prefix has another fingerprint
    other = tmp_path / "other"
    pack(
        [str(write_jsonl(tmp_path / "o.jsonl", make_docs(150, seed=9)))],
        str(work["tok"]),
        32,
        str(other),
        progress=False,
    )
    assert PackedDataset(other).verify() != fingerprint


def test_a_pack_without_fingerprint_is_scanned_for_its_largest_id(packed, tmp_path):
    old = copy_pack(packed, tmp_path / "old")
    meta = json.loads(Path(f"{old}.json").read_text())
    del meta["fingerprint"]
    Path(f"{old}.json").write_text(json.dumps(meta))
    assert PackedDataset(old).verify() == PackedDataset(packed).verify()  # computed, the same digests
    overwrite_bytes(f"{old}.bin", 40, b"\xff" * 10)
    with pytest.raises(DataError, match=f"^{old}.bin: holds token id 65535, its index says the largest is"):
        PackedDataset(old).verify()


def test_each_batch_is_checked_for_ids_beyond_the_vocabulary(packed, tmp_path):
    ds = PackedDataset(packed)
    ds.check_ids(np.arange(len(ds)), ds.max_token_id + 1)  # nothing beyond: no error
    with pytest.raises(
        DataError,
        match=f"^{packed}.bin: row \\d+ holds token id {ds.max_token_id}, beyond the "
        f"model's vocabulary of {ds.max_token_id}",
    ):
        ds.check_ids(np.arange(len(ds)), ds.max_token_id)
    bad = copy_pack(packed, tmp_path / "bad")
    overwrite_bytes(f"{bad}.bin", 5 * 32 * 2 + 6, b"\xff\xff")  # row 5, token 3
    ds = PackedDataset(bad)
    ds.check_ids([0, 1, 2, 4], 1000)
    with pytest.raises(DataError, match=f"^{bad}.bin: row 5 holds token id 65535"):
        ds.check_ids([0, 7, 5, 2], 1000)


def test_one_writer_per_prefix_and_a_dead_writers_lock_is_taken_over(work, tmp_path):
    """A second pack of one --out while the first runs is refused in one line naming the first (two
    at once once mixed one's .bin with the other's .idx); a lock whose process died is taken over."""
    import socket

    from megatron_mlkv.integrity import OutputLocked

    prefix, corpus, tok = tmp_path / "out", str(work["corpus"]), str(work["tok"])
    lock = Path(f"{prefix}.lock")
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": alive.pid, "started": "then"}))
        with pytest.raises(OutputLocked, match=rf"^--out {prefix} is being written by process {alive.pid} on "):
            pack([corpus], tok, 64, str(prefix), progress=False)
        assert [p.name for p in tmp_path.glob("out*")] == ["out.lock"]  # nothing written beside the lock
    finally:
        alive.kill()
        alive.wait()
    meta = pack([corpus], tok, 64, str(prefix), progress=False)  # its writer is dead: taken over
    assert meta["rows"] == len(PackedDataset(prefix)) and not lock.exists()  # and released
