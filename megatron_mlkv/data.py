"""Packed-document data: `pack` (behind data_tools/pack_pile.py) and `PackedDataset`.

Documents are tokenized, an end-of-document (EOD) token is appended to each, and they are packed
into rows of `seq_len` tokens. Three files per prefix:

    PREFIX.bin   all rows back to back, token ids (uint16 when the vocabulary fits, else uint32)
    PREFIX.idx   header (magic, version, dtype, seq_len, rows, documents), then per row its offset in
                 .bin, its number of real tokens (the rest is padding) and a pointer into the
                 document-start table, so document-aware masks are possible
    PREFIX.json  metadata: tokenizer, sources, counts, fill ratio, versions

Packing `best-fit` (default): a document that fits in a row is never split; documents are placed
best-fit-decreasing within windows of documents (memory stays flat on millions of documents); a
longer document becomes full rows plus one remainder piece that is packed like a document.
Packing `reference`: the public reference implementation's greedy packing (see `_pack_reference`).
"""
from __future__ import annotations

import bisect
import glob
import json
import os
import random
import struct
from pathlib import Path

import numpy as np
import torch

MAGIC = b"MLKVPACK"
VERSION = 1
HEADER = struct.Struct("<8sIIIQQ")  # magic, version, dtype bytes, seq_len, rows, documents
PACKINGS = ("best-fit", "reference")
DEFAULT_SOURCE = "EleutherAI/the_pile_deduplicated"
LOCAL_SUFFIXES = (".jsonl", ".jsonl.zst", ".json", ".parquet", ".txt")
WINDOW_DOCS = 20_000  # documents per best-fit window
REFERENCE_CHUNK = 2000  # documents per sorted chunk of the reference packing


class DataError(ValueError):
    """A data file or document that cannot be used; the message names the file (and line)."""


# --------------------------------------------------------------------------------------------------
# Reading: PackedDataset and the training order
# --------------------------------------------------------------------------------------------------

class PackedDataset:
    """Rows of a packed prefix, memory-mapped: `ds[i]` is a (seq_len,) integer array (a view, no copy).

    Opening reads only the header and metadata; workers and ranks each map the files themselves
    (the object pickles without its maps), so it is safe in DataLoader workers.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        paths = {ext: Path(f"{self.prefix}.{ext}") for ext in ("bin", "idx", "json")}
        for ext, path in paths.items():
            if not path.is_file():
                raise DataError(f"{path}: missing (expected {self.prefix}.bin/.idx/.json from pack_pile.py)")
        try:
            self.meta = json.loads(paths["json"].read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{paths['json']}: corrupt metadata (line {e.lineno}: {e.msg})") from None
        raw = paths["idx"].read_bytes()
        if len(raw) < HEADER.size:
            raise DataError(f"{paths['idx']}: truncated index")
        magic, version, width, self.seq_len, self.num_rows, self.num_docs = HEADER.unpack_from(raw)
        if magic != MAGIC or version != VERSION or width not in (2, 4):
            raise DataError(f"{paths['idx']}: not a packed index of version {VERSION} (bad header)")
        n = self.num_rows
        expected = HEADER.size + 8 * (n + 1) + 4 * n + 8 * (n + 1)
        if len(raw) < expected:
            raise DataError(f"{paths['idx']}: truncated index ({len(raw)} bytes, expected at least {expected})")
        at = HEADER.size
        self._row_offsets = np.frombuffer(raw, np.uint64, n + 1, at)
        at += 8 * (n + 1)
        self._row_tokens = np.frombuffer(raw, np.uint32, n, at)
        at += 4 * n
        self._doc_ptr = np.frombuffer(raw, np.uint64, n + 1, at)
        at += 8 * (n + 1)
        self._doc_starts = np.frombuffer(raw, np.uint32, int(self._doc_ptr[-1]), at)
        self.dtype = np.uint16 if width == 2 else np.uint32
        size = paths["bin"].stat().st_size
        if size != n * self.seq_len * width:
            raise DataError(f"{paths['bin']}: {size} bytes, expected {n * self.seq_len * width} "
                            f"({n} rows of {self.seq_len} tokens); the file is truncated or from another pack")
        self.pad_id = int(self.meta["pad_id"])
        self.eod_id = int(self.meta["eod_id"])
        self.vocab_size = int(self.meta["vocab_size"])
        self.max_token_id = int(self.meta["max_token_id"])
        self._tokens = None

    def _map(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.memmap(f"{self.prefix}.bin", dtype=self.dtype, mode="r",
                                     shape=(self.num_rows, self.seq_len))
        return self._tokens

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tokens"] = None  # each process maps the file itself
        return state

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, i: int) -> np.ndarray:
        if not -self.num_rows <= i < self.num_rows:
            raise IndexError(f"row {i} out of range for {self.num_rows} rows")
        return self._map()[i]

    def loss_mask(self, i: int) -> np.ndarray:
        """(seq_len,) bool: True on document tokens, False on padding."""
        return np.arange(self.seq_len) < self._row_tokens[i]

    def doc_boundaries(self, i: int) -> np.ndarray:
        """Start offsets of the documents (or document pieces) in row i; the first is 0."""
        return self._doc_starts[int(self._doc_ptr[i]):int(self._doc_ptr[i + 1])].astype(np.int64)


class RowSampler:
    """The global order of rows: `batch(step)` is the same array of `global_batch` row indices for a
    given step whatever the number of ranks, so a run resumed at step k continues exactly.

    seed None: rows in packed order (the paper's); an int: a seeded permutation per pass. Steps
    beyond one pass start the next pass (`steps_per_pass` steps each)."""

    def __init__(self, num_rows: int, global_batch: int, seed: int | None = None):
        self.num_rows, self.global_batch, self.seed = num_rows, global_batch, seed
        self.steps_per_pass = num_rows // global_batch
        self._order_pass, self._order = None, None

    def _pass_order(self, p: int) -> np.ndarray:
        if self._order_pass != p:
            self._order = np.arange(self.num_rows) if self.seed is None else \
                np.random.default_rng([self.seed, p]).permutation(self.num_rows)
            self._order_pass = p
        return self._order

    def batch(self, step: int) -> np.ndarray:
        if self.steps_per_pass == 0:  # fewer rows than a batch: cycle through them
            return np.arange(step * self.global_batch, (step + 1) * self.global_batch) % self.num_rows
        p, k = divmod(step, self.steps_per_pass)
        return self._pass_order(p)[k * self.global_batch:(k + 1) * self.global_batch]


def rank_slice(rows: np.ndarray, dp_rank: int, dp_size: int) -> np.ndarray:
    """The contiguous share of a global batch that data-parallel rank `dp_rank` trains on."""
    per = len(rows) // dp_size
    return rows[dp_rank * per:(dp_rank + 1) * per]


def collate(ds: PackedDataset, rows) -> dict:
    """Rows -> `input_ids` (b, s) int64 and `labels` (b, s) int64 with -100 on padding (the model
    shifts labels: position t predicts labels[t + 1])."""
    ids = torch.from_numpy(np.stack([ds[int(r)] for r in rows]).astype(np.int64))
    mask = torch.from_numpy(np.stack([ds.loss_mask(int(r)) for r in rows]))
    return {"input_ids": ids, "labels": ids.masked_fill(~mask, -100)}


# --------------------------------------------------------------------------------------------------
# Sources and tokenizers
# --------------------------------------------------------------------------------------------------

def _local_files(sources: list[str]) -> list[Path] | None:
    """The local files named by `sources` (globs expanded), or None when they name a hub dataset."""
    files = []
    for src in sources:
        matches = sorted(glob.glob(os.path.expanduser(src))) if any(c in src for c in "*?[") else [src]
        if not matches:
            raise DataError(f"--input {src}: no file matches")
        for m in matches:
            path = Path(m)
            if not path.name.endswith(LOCAL_SUFFIXES):
                if path.exists() or len(sources) > 1 or src.count("/") != 1:
                    raise DataError(f"--input {m}: unsupported file type; expected {', '.join(LOCAL_SUFFIXES)}")
                return None  # 'owner/name': a hub dataset
            if not path.is_file():
                raise DataError(f"--input {m}: no such file")
            files.append(path)
    return files


def _find_bad_json_line(path: Path) -> str:
    """'file:line: reason' of the first line of a .jsonl(.zst) that is not a JSON object."""
    if path.name.endswith(".zst"):
        import io
        import zstandard
        handle = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")), encoding="utf-8")
    else:
        handle = open(path, encoding="utf-8")
    with handle:
        for n, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                if not isinstance(json.loads(line), dict):
                    return f"{path}:{n}: expected a JSON object per line"
            except json.JSONDecodeError as e:
                return f"{path}:{n}: malformed JSON ({e.msg})"
    return f"{path}: cannot be read as JSON lines"


def _file_documents(path: Path, text_key: str):
    """Texts of one local file, in file order, read through `datasets`."""
    from datasets import load_dataset
    name = path.name
    builder = "parquet" if name.endswith(".parquet") else "text" if name.endswith(".txt") else "json"
    key = "text" if builder == "text" else text_key
    try:
        ds = load_dataset(builder, data_files=str(path), split="train", streaming=True)
        for n, record in enumerate(ds, 1):
            if key not in record or not isinstance(record[key], str):
                raise DataError(f"{path}: document {n} has no string field '{key}' (set --text-key)")
            if builder == "text" and not record[key].strip():
                continue
            yield record[key]
    except DataError:
        raise
    except Exception as e:  # pyarrow/datasets errors on malformed files
        if builder == "json" and ".jsonl" in name:
            raise DataError(_find_bad_json_line(path)) from None
        raise DataError(f"{path}: cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def iter_documents(sources: list[str], text_key: str = "text"):
    """Document texts from local files (in the order given) or a streamed hub dataset."""
    files = _local_files(sources)
    if files is None:
        from datasets import load_dataset
        try:
            ds = load_dataset(sources[0], split="train", streaming=True)
        except Exception as e:
            raise DataError(f"--input {sources[0]}: cannot open this hub dataset "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        for n, record in enumerate(ds, 1):
            if text_key not in record:
                raise DataError(f"--input {sources[0]}: document {n} has no field '{text_key}' (set --text-key)")
            yield record[text_key]
        return
    for path in files:
        yield from _file_documents(path, text_key)


class Tokenizer:
    """A fast tokenizer (hub name, folder or tokenizer.json) or a sentencepiece .model, with its EOD id."""

    def __init__(self, name: str):
        self.name = str(name)
        self.sp = None
        if self.name.endswith(".model"):
            import sentencepiece as spm
            if not Path(self.name).is_file():
                raise DataError(f"--tokenizer {self.name}: no such file")
            self.sp = spm.SentencePieceProcessor(model_file=self.name)
            self.eod_id, self.vocab_size = self.sp.eos_id(), self.sp.get_piece_size()
            if self.eod_id < 0:
                raise DataError(f"--tokenizer {self.name}: the sentencepiece model has no end-of-sequence token")
            return
        try:
            if self.name.endswith(".json"):
                from transformers import PreTrainedTokenizerFast
                self.tok = PreTrainedTokenizerFast(tokenizer_file=self.name)
            else:
                from transformers import AutoTokenizer
                self.tok = AutoTokenizer.from_pretrained(self.name)
        except Exception as e:
            raise DataError(f"--tokenizer {self.name}: cannot load ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        eod = self.tok.eos_token_id
        if eod is None:
            eod = self.tok.convert_tokens_to_ids("<|endoftext|>")
        if eod is None or eod == self.tok.unk_token_id and self.tok.unk_token != "<|endoftext|>":
            raise DataError(f"--tokenizer {self.name}: no end-of-document token (eos_token or <|endoftext|>)")
        self.eod_id, self.vocab_size = int(eod), len(self.tok)

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self.sp is not None:
            return self.sp.encode(texts)
        return self.tok(texts, add_special_tokens=False)["input_ids"]


_WORKER_TOKENIZER = None


def _init_worker(name: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = Tokenizer(name)


def _encode_batch(texts: list[str]) -> list[list[int]]:
    return _WORKER_TOKENIZER.encode(texts)


def _batches(texts, size: int = 1000):
    batch = []
    for t in texts:
        batch.append(t)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# --------------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------------

class _RowWriter:
    """Appends rows (lists of token-id pieces) to the .bin and records the index columns."""

    def __init__(self, path: Path, seq_len: int, dtype, pad_id: int):
        self.file = open(path, "wb")
        self.seq_len, self.dtype, self.pad_id = seq_len, dtype, pad_id
        self.row_tokens, self.doc_ptr, self.doc_starts = [], [0], []
        self.max_id = 0

    def write(self, pieces: list[list[int]]) -> None:
        row = np.full(self.seq_len, self.pad_id, dtype=self.dtype)
        at = 0
        for piece in pieces:
            row[at:at + len(piece)] = piece
            self.doc_starts.append(at)
            at += len(piece)
            self.max_id = max(self.max_id, max(piece))
        self.file.write(row.tobytes())
        self.row_tokens.append(at)
        self.doc_ptr.append(len(self.doc_starts))

    def close(self) -> None:
        self.file.close()


def _best_fit(docs: list[list[int]], seq_len: int, write) -> None:
    """Best-fit decreasing of pieces no longer than seq_len into rows; rows written in creation order."""
    rows: list[list[list[int]]] = []
    free: list[tuple[int, int]] = []  # sorted (free space, row index) of open rows
    for doc in sorted(docs, key=len, reverse=True):
        i = bisect.bisect_left(free, (len(doc), -1))
        if i < len(free):
            space, r = free.pop(i)
        else:
            space, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(doc)
        if space - len(doc) > 0:
            bisect.insort(free, (space - len(doc), r))
    for row in rows:
        write(row)


def _pack_best_fit(token_docs, seq_len: int, max_doc_tokens: int | None, writer: _RowWriter, stats: dict) -> None:
    window = []
    for doc in token_docs:
        if max_doc_tokens is not None and len(doc) > max_doc_tokens:
            stats["truncated_tokens"] += len(doc) - max_doc_tokens
            doc = doc[:max_doc_tokens]
        for start in range(0, len(doc) - len(doc) % seq_len, seq_len):  # full rows of a long document
            writer.write([doc[start:start + seq_len]])
        rest = doc[len(doc) - len(doc) % seq_len:]
        if rest:
            window.append(rest)
        if len(window) >= WINDOW_DOCS:
            _best_fit(window, seq_len, writer.write)
            window = []
    _best_fit(window, seq_len, writer.write)


def _pack_reference(token_docs, seq_len: int, writer: _RowWriter, stats: dict) -> None:
    """The reference implementation: each document truncated to seq_len - 1 tokens (+ EOD), read in
    chunks of 2000 sorted shortest first, appended greedily to the current row and never split;
    the row is closed (padded) when the next document does not fit."""
    row, used = [], 0

    def flush_chunk(chunk):
        nonlocal row, used
        for doc in sorted(chunk, key=len):
            if used + len(doc) > seq_len:
                writer.write(row)
                row, used = [], 0
            row.append(doc)
            used += len(doc)

    chunk = []
    for doc in token_docs:
        if len(doc) > seq_len:
            stats["truncated_tokens"] += len(doc) - seq_len
            doc = doc[:seq_len - 1] + doc[-1:]  # keep the EOD
        chunk.append(doc)
        if len(chunk) == REFERENCE_CHUNK:
            flush_chunk(chunk)
            chunk = []
    flush_chunk(chunk)
    if row:
        writer.write(row)


def pack(inputs, tokenizer: str, seq_len: int, out_prefix: str, num_docs: int | None = None,
         fraction: float | None = None, seed: int = 0, text_key: str = "text", packing: str = "best-fit",
         max_doc_tokens: int | None = None, workers: int = 1, progress: bool = True) -> dict:
    """Tokenize the documents of `inputs`, pack them into rows of `seq_len` and write `out_prefix`.*.

    `num_docs`: the first N documents in source order; `fraction`: a seeded Bernoulli sample (`seed`).
    Output goes to temporary names renamed at the end (.json last), so a prefix whose .json exists
    is complete. Returns the metadata written to PREFIX.json.
    """
    from tqdm import tqdm

    if isinstance(inputs, (str, os.PathLike)):
        inputs = [str(inputs)]
    inputs = [str(i) for i in inputs]
    if packing not in PACKINGS:
        raise DataError(f"--packing {packing}: allowed {', '.join(PACKINGS)}")
    if seq_len < 2:
        raise DataError(f"--seq-len {seq_len}: must be at least 2")
    if fraction is not None and not 0 < fraction <= 1:
        raise DataError(f"--fraction {fraction}: must be in (0, 1]")
    if num_docs is not None and num_docs < 1:
        raise DataError(f"--num-docs {num_docs}: must be positive")
    if max_doc_tokens is not None and max_doc_tokens < 1:
        raise DataError(f"--max-doc-tokens {max_doc_tokens}: must be positive")
    tok = Tokenizer(tokenizer)
    _local_files(inputs)  # fail on missing files before any work
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    out = Path(out_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = {ext: out.with_name(f".{out.name}.{ext}.tmp") for ext in ("bin", "idx", "json")}
    final = {ext: Path(f"{out_prefix}.{ext}") for ext in ("bin", "idx", "json")}
    final["json"].unlink(missing_ok=True)  # the prefix is incomplete until the new .json lands

    def texts():
        rng = random.Random(seed)
        kept = 0
        for text in iter_documents(inputs, text_key):
            if fraction is not None and rng.random() >= fraction:
                continue
            yield text
            kept += 1
            if num_docs is not None and kept >= num_docs:
                return

    stats = {"documents": 0, "document_tokens": 0, "truncated_tokens": 0}
    bar = tqdm(desc="pack", unit="doc", disable=not progress)

    def token_docs():
        pool = None
        if workers > 1:
            import multiprocessing as mp
            pool = mp.get_context("spawn").Pool(workers, _init_worker, (tokenizer,))
            encoded = pool.imap(_encode_batch, _batches(texts()), chunksize=1)  # ordered: deterministic
        else:
            encoded = map(tok.encode, _batches(texts()))
        try:
            for batch in encoded:
                bar.update(len(batch))
                for ids in batch:
                    doc = list(ids) + [tok.eod_id]
                    stats["documents"] += 1
                    stats["document_tokens"] += len(doc)
                    yield doc
        finally:
            if pool is not None:
                pool.terminate()

    writer = _RowWriter(tmp["bin"], seq_len, dtype, tok.eod_id)
    try:
        if packing == "best-fit":
            _pack_best_fit(token_docs(), seq_len, max_doc_tokens, writer, stats)
        else:
            _pack_reference(token_docs(), seq_len, writer, stats)
        writer.close()
        bar.close()
        rows = len(writer.row_tokens)
        if rows == 0:
            raise DataError(f"--input {' '.join(inputs)}: no documents")
        header = HEADER.pack(MAGIC, VERSION, np.dtype(dtype).itemsize, seq_len, rows, stats["documents"])
        with open(tmp["idx"], "wb") as f:
            f.write(header)
            f.write((np.arange(rows + 1, dtype=np.uint64) * seq_len).tobytes())
            f.write(np.asarray(writer.row_tokens, dtype=np.uint32).tobytes())
            f.write(np.asarray(writer.doc_ptr, dtype=np.uint64).tobytes())
            f.write(np.asarray(writer.doc_starts, dtype=np.uint32).tobytes())
        kept_tokens = int(sum(writer.row_tokens))
        import datasets
        import tokenizers
        meta = {
            "format_version": VERSION, "tokenizer": tok.name, "sources": inputs, "text_key": text_key,
            "seq_len": seq_len, "rows": rows, "documents": stats["documents"],
            "document_tokens": stats["document_tokens"], "kept_tokens": kept_tokens,
            "truncated_tokens": stats["truncated_tokens"], "fill_ratio": kept_tokens / (rows * seq_len),
            "packing": packing, "num_docs": num_docs, "fraction": fraction, "seed": seed,
            "max_doc_tokens": max_doc_tokens, "dtype": np.dtype(dtype).name, "eod_id": tok.eod_id,
            "pad_id": tok.eod_id, "vocab_size": tok.vocab_size, "max_token_id": int(writer.max_id),
            "versions": {"megatron_mlkv_data": VERSION, "datasets": datasets.__version__,
                         "tokenizers": tokenizers.__version__, "numpy": np.__version__},
        }
        tmp["json"].write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp["bin"], final["bin"])
        os.replace(tmp["idx"], final["idx"])
        os.replace(tmp["json"], final["json"])
        return meta
    finally:
        writer.file.close()
        bar.close()
        for path in tmp.values():
            path.unlink(missing_ok=True)


def format_summary(meta: dict, prefix: str) -> str:
    """The pack report as a small markdown table."""
    rows = [("rows", f"{meta['rows']:,} x {meta['seq_len']} tokens"), ("documents", f"{meta['documents']:,}"),
            ("document tokens", f"{meta['document_tokens']:,}"), ("truncated tokens", f"{meta['truncated_tokens']:,}"),
            ("fill ratio", f"{meta['fill_ratio']:.4%}"), ("packing", meta["packing"]), ("dtype", meta["dtype"])]
    return "\n".join([f"{prefix}.bin/.idx/.json", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])
