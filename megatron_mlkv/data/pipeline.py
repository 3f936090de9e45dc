"""The pack pipeline behind data_tools/pack_pile.py: documents in, PREFIX.bin/.idx/.json out
(format: `dataset`).


Packing `best-fit` (default): a document that fits in a row is never split. Documents are cut into
pieces of at most seq_len tokens (only longer documents have more than one piece) and the pieces
of each window of `WINDOW_PIECES` are placed best-fit-decreasing: longest first, each into the open
row with the least room that still holds it. Windows keep memory flat on millions of documents.
"""

from __future__ import annotations

import bisect
import json
import os
from array import array
from pathlib import Path

import numpy as np

from ..integrity import ALGORITHM, OutputLock, file_digest
from .dataset import HEADER, HEADER_SIZE, MAGIC, VERSION, DataError
from .sources import iter_documents, resolve_sources, select_documents
from .tokenizer import Tokenizer, _batched, encode_documents

PACKINGS = ("best-fit", "reference")
WINDOW_PIECES = 20_000  # best-fit window: at most 20k pieces of <= seq_len tokens in memory
REFERENCE_CHUNK = 2000  # documents per sorted chunk of the reference packing
# --------------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------------


def truncate(doc: np.ndarray, limit: int | None, stats: dict) -> np.ndarray:
    """`doc` cut to `limit` tokens, its EOD kept as the last one; cut tokens are counted in stats."""
    if limit is None or len(doc) <= limit:
        return doc
    stats["truncated_tokens"] += len(doc) - limit
    return np.concatenate([doc[: limit - 1], doc[-1:]])


def _best_fit_decreasing(pieces: list[np.ndarray], seq_len: int, write) -> None:
    """Place pieces (<= seq_len tokens each) longest first into the open row with the least room that
    holds them; `write` each row (a list of pieces) in the order rows were opened."""
    rows: list[list[np.ndarray]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted: bisect finds the tightest fit
    for i in sorted(range(len(pieces)), key=lambda i: -len(pieces[i])):  # stable: ties keep source order
        piece = pieces[i]
        j = bisect.bisect_left(free, (len(piece), -1))
        if j < len(free):
            room, r = free.pop(j)
        else:
            room, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(piece)
        if room > len(piece):
            bisect.insort(free, (room - len(piece), r))
    for row in rows:
        write(row)


def pack_best_fit(docs, seq_len: int, write, stats: dict, window: int | None = None) -> None:
    """Best-fit packing: documents longer than a row become row-sized pieces plus a remainder; the
    pieces of each window (`WINDOW_PIECES`) are placed best-fit-decreasing, so a document that fits
    is never split."""
    window = window or WINDOW_PIECES
    pending = []
    for doc in docs:
        if len(doc) > seq_len:
            stats["split_documents"] += 1
        pending.extend(doc[i : i + seq_len] for i in range(0, len(doc), seq_len))
        if len(pending) >= window:
            _best_fit_decreasing(pending, seq_len, write)
            pending = []
    _best_fit_decreasing(pending, seq_len, write)


def pack_reference(docs, seq_len: int, write, chunk: int | None = None) -> None:
    """The reference implementation's packing (zaydzuhri/pythia-mlkv, pack_data.py): documents (already
    truncated, EOD appended) are read in chunks of 2000, each chunk sorted shortest first (stable);
    each document is appended to the current row, never split, and the row is closed (padded) when the
    next document does not fit; the last row of a chunk is closed at the chunk's end."""
    for batch in _batched(docs, chunk or REFERENCE_CHUNK):
        row, used = [], 0
        for doc in sorted(batch, key=len):
            if row and used + len(doc) > seq_len:
                write(row)
                row, used = [], 0
            row.append(doc)
            used += len(doc)
        if row:
            write(row)


class _RowWriter:
    """Writes rows (lists of pieces) to the .bin file and keeps the index columns (compact arrays)."""

    def __init__(self, file, seq_len: int, dtype: np.dtype, pad_id: int):
        self.file, self.seq_len, self.dtype, self.pad_id = file, seq_len, dtype, pad_id
        self.row_tokens, self.doc_ptr, self.doc_starts = array("I"), array("Q", [0]), array("I")
        self.max_id = 0

    def __call__(self, pieces: list[np.ndarray]) -> None:
        row = np.full(self.seq_len, self.pad_id, dtype=self.dtype)
        at = 0
        for piece in pieces:
            row[at : at + len(piece)] = piece
            self.doc_starts.append(at)
            at += len(piece)
        self.max_id = max(self.max_id, max(int(p.max()) for p in pieces))
        row.tofile(self.file)
        self.row_tokens.append(at)
        self.doc_ptr.append(len(self.doc_starts))

    def write_index(self, path: Path) -> None:
        rows = len(self.row_tokens)
        header = HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self.seq_len, rows, len(self.doc_starts), self.max_id)
        with open(path, "wb") as f:
            f.write(header.ljust(HEADER_SIZE, b"\0"))
            f.write((np.arange(rows + 1, dtype=np.uint64) * self.seq_len).tobytes())
            f.write(np.asarray(self.doc_ptr, dtype="<u8").tobytes())
            f.write(np.asarray(self.row_tokens, dtype="<u4").tobytes())
            f.write(np.asarray(self.doc_starts, dtype="<u4").tobytes())


def _versions() -> dict:
    from importlib import metadata

    out = {"format": VERSION}
    for name in ("megatron-mlkv", "datasets", "tokenizers", "transformers", "sentencepiece", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _check_options(seq_len, num_docs, fraction, packing, max_doc_tokens, workers) -> None:
    if packing not in PACKINGS:
        raise DataError(f"--packing {packing}: allowed {', '.join(PACKINGS)}")
    if not 2 <= seq_len < 2**32:
        raise DataError(f"--seq-len {seq_len}: must be at least 2")
    if num_docs is not None and num_docs < 1:
        raise DataError(f"--num-docs {num_docs}: must be at least 1")
    if fraction is not None and not 0 < fraction <= 1:
        raise DataError(f"--fraction {fraction}: must be in (0, 1]")
    if max_doc_tokens is not None and max_doc_tokens < 1:
        raise DataError(f"--max-doc-tokens {max_doc_tokens}: must be at least 1")
    if workers < 1:
        raise DataError(f"--workers {workers}: must be at least 1")


def pack(
    inputs,
    tokenizer: str,
    seq_len: int,
    out_prefix: str,
    num_docs: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
    text_key: str = "text",
    packing: str = "best-fit",
    max_doc_tokens: int | None = None,
    workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Tokenize the documents of `inputs`, pack them into rows of `seq_len` tokens, write `out_prefix`.*.

    inputs: local .jsonl/.jsonl.zst/.json/.parquet/.txt files, globs or folders, or one hub dataset
    name (streamed). tokenizer: hub name, folder, tokenizer.json or sentencepiece .model. num_docs: the
    first N documents; fraction: a `seed`ed sample (see `select_documents`). max_doc_tokens: keep at
    most this many tokens of a document (EOD included); `reference` packing also truncates every
    document to seq_len - 1 tokens + EOD. workers: tokenizer processes (the output does not depend
    on it). Raises DataError on bad input and on an existing prefix unless `overwrite` (a run resuming
    on it would read other rows); an existing prefix is only replaced when everything succeeded.
    Returns the metadata written to PREFIX.json.
    """
    from tqdm import tqdm

    inputs = [str(inputs)] if isinstance(inputs, (str, os.PathLike)) else [str(i) for i in inputs]
    _check_options(seq_len, num_docs, fraction, packing, max_doc_tokens, workers)
    if not inputs:
        raise DataError("--input: give at least one source")
    sources = resolve_sources(inputs)  # fails on missing files before any work
    tok = Tokenizer(tokenizer)
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 2**16 else np.uint32)
    limit = max_doc_tokens if packing == "best-fit" else min(seq_len, max_doc_tokens or seq_len)

    final = {ext: Path(f"{out_prefix}.{ext}") for ext in ("bin", "idx", "json")}
    existing = [str(path) for path in final.values() if path.exists()]
    if existing and not overwrite:
        raise DataError(f"--out {out_prefix}: {', '.join(existing)} already exist(s); pass --overwrite to replace")
    # one writer per prefix (`OutputLock`), and temporary names of this process's own
    tmp = {ext: path.with_name(f"{path.name}.tmp-{os.getpid()}") for ext, path in final.items()}
    try:
        final["bin"].parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--out {out_prefix}: cannot create {final['bin'].parent} ({e.strerror})") from None
    lock = OutputLock(f"{out_prefix}.lock", f"--out {out_prefix}")
    lock.__enter__()  # released in the `finally` below
    stats = {"documents": 0, "empty_documents": 0, "document_tokens": 0, "truncated_tokens": 0, "split_documents": 0}
    bar = None  # made at the first document, so an error before it is the only thing on stderr

    def non_empty(texts):  # an empty or blank document would be an end-of-document token alone
        for text in texts:
            if text.strip():
                yield text
            else:
                stats["empty_documents"] += 1

    def documents():
        nonlocal bar
        texts = select_documents(non_empty(iter_documents(inputs, text_key)), num_docs, fraction, seed)
        for doc in encode_documents(texts, tok, workers):
            if bar is None:
                bar = tqdm(desc=f"pack {Path(out_prefix).name}", unit=" docs", total=num_docs, disable=not progress)
            stats["documents"] += 1
            stats["document_tokens"] += len(doc)
            bar.update()
            yield truncate(doc, limit, stats)

    try:
        docs = documents()
        with open(tmp["bin"], "wb") as f:
            writer = _RowWriter(f, seq_len, dtype, tok.eod_id)
            if packing == "best-fit":
                pack_best_fit(docs, seq_len, writer, stats)
            else:
                pack_reference(docs, seq_len, writer)
        rows = len(writer.row_tokens)
        if rows == 0:
            raise DataError(f"--input {' '.join(inputs)}: no documents")
        if writer.max_id >= 2 ** (8 * dtype.itemsize):
            raise DataError(
                f"--tokenizer {tok.name}: produced token id {writer.max_id}, beyond its vocabulary of {tok.vocab_size}"
            )
        writer.write_index(tmp["idx"])
        fingerprint = {"algorithm": ALGORITHM, "bin": file_digest(tmp["bin"]), "idx": file_digest(tmp["idx"])}
        kept = int(np.sum(np.asarray(writer.row_tokens, dtype=np.int64)))
        meta = {
            "seq_len": seq_len,
            "rows": rows,
            "documents": stats["documents"],
            "empty_documents": stats["empty_documents"],
            "pieces": len(writer.doc_starts),
            "document_tokens": stats["document_tokens"],
            "kept_tokens": kept,
            "truncated_tokens": stats["truncated_tokens"],
            "split_documents": stats["split_documents"],
            "padding_tokens": rows * seq_len - kept,
            "fill_ratio": kept / (rows * seq_len),
            "packing": packing,
            "tokenizer": tok.name,
            "tokenizer_fingerprint": tok.fingerprint,
            "vocab_size": tok.vocab_size,
            "eod_id": tok.eod_id,
            "pad_id": tok.eod_id,
            "max_token_id": writer.max_id,
            "dtype": dtype.name,
            "sources": inputs,
            "files": None if isinstance(sources, str) else [str(p) for p in sources],
            "text_key": text_key,
            "num_docs": num_docs,
            "fraction": fraction,
            "seed": seed,
            "max_doc_tokens": max_doc_tokens,
            "fingerprint": fingerprint,
            "versions": _versions(),
        }
        tmp["json"].write_text(json.dumps(meta, indent=2) + "\n")
        final["json"].unlink(missing_ok=True)  # from here until the last rename the prefix reads as incomplete
        for ext in ("bin", "idx", "json"):
            os.replace(tmp[ext], final[ext])
        return meta
    finally:
        docs.close()  # stops the tokenizer processes on an error
        if bar is not None:
            bar.close()
        for path in tmp.values():
            path.unlink(missing_ok=True)
        lock.release()


def format_summary(meta: dict, prefix: str) -> str:
    """The pack report: a small markdown table."""
    rows = [
        ("rows", f"{meta['rows']:,} x {meta['seq_len']:,} tokens ({meta['dtype']})"),
        ("documents", f"{meta['documents']:,} ({meta['split_documents']:,} split across rows)"),
        ("document tokens", f"{meta['document_tokens']:,}"),
        ("truncated tokens", f"{meta['truncated_tokens']:,}"),
        ("fill ratio", f"{meta['fill_ratio']:.4%}"),
        ("packing", meta["packing"]),
    ]
    return "\n".join([f"{prefix}.bin / .idx / .json", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])
