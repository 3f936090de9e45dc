"""Packed-document data: `pack` (behind data_tools/pack_pile.py), `PackedDataset`, `RowSampler`.

Documents are tokenized, an end-of-document (EOD) token is appended to each, and the documents are
packed into rows of exactly `seq_len` tokens; what a row does not fill is padding (`pad_id`, no loss).
Three files per prefix:

    PREFIX.bin   the rows back to back: rows x seq_len token ids, uint16 when the vocabulary fits
                 (<= 65536 ids), else uint32
    PREFIX.idx   a 64-byte header, then four little-endian columns:
                   header       magic b"MLKVPACK", version u32, token bytes u32, seq_len u32,
                                rows u64, pieces u64, max_token_id u64 (zero-padded to 64 bytes)
                   row_offsets  u64[rows + 1]  start of each row in .bin, in tokens (row i at i * seq_len)
                   doc_ptr      u64[rows + 1]  row i's documents are doc_starts[doc_ptr[i]:doc_ptr[i + 1]]
                   row_tokens   u32[rows]      real tokens at the start of row i; the rest is padding
                   doc_starts   u32[pieces]    offset of each document (or document piece) in its row
    PREFIX.json  metadata: tokenizer, sources, counts, fill ratio, ids, versions, and the fingerprint:
                 an XXH3-128 digest of .bin and of .idx (`integrity`), which `PackedDataset.verify`
                 checks, so a file damaged or replaced after packing is found before training

The three files are written under temporary names and renamed at the end, .json last: a prefix with a
.json is complete.

Packing `best-fit` (default): a document that fits in a row is never split. Documents are cut into
pieces of at most seq_len tokens (only longer documents have more than one piece) and the pieces
of each window of `WINDOW_PIECES` are placed best-fit-decreasing: longest first, each into the open
row with the least room that still holds it. Windows keep memory flat on millions of documents.
Packing `reference`: the public reference implementation of the MLKV paper, see `pack_reference`.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import glob
import io
import json
import os
import random
import struct
from array import array
from pathlib import Path

import numpy as np

from .integrity import ALGORITHM, file_digest

MAGIC = b"MLKVPACK"
VERSION = 1
HEADER = struct.Struct("<8sIIIQQQ")  # magic, version, token bytes, seq_len, rows, pieces, max_token_id
HEADER_SIZE = 64  # the header is zero-padded so the columns after it are 8-byte aligned
PACKINGS = ("best-fit", "reference")
DEFAULT_SOURCE = "EleutherAI/the_pile_deduplicated"
LOCAL_SUFFIXES = (".jsonl", ".jsonl.zst", ".json", ".parquet", ".txt")
EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eos|>")
WINDOW_PIECES = 20_000  # best-fit window: at most 20k pieces of <= seq_len tokens in memory
REFERENCE_CHUNK = 2000  # documents per sorted chunk of the reference packing
ENCODE_BATCH = 256  # documents per tokenizer call (and per task of a worker process)
META_KEYS = ("seq_len", "rows", "pad_id", "eod_id", "vocab_size", "max_token_id")


class DataError(ValueError):
    """A data file, document, tokenizer or option that cannot be used; one line naming the file."""


# --------------------------------------------------------------------------------------------------
# Reading: PackedDataset, the training order, batches
# --------------------------------------------------------------------------------------------------


class PackedDataset:
    """The rows of a packed prefix, memory-mapped: `ds[i]` is a (seq_len,) integer array, a read-only
    view of PREFIX.bin (no copy).

    Opening reads the metadata and the index header and checks every file's size; the maps are made
    on first access in each process (the object pickles without them), so one dataset object can be
    handed to DataLoader workers (fork or spawn) and opened by every rank.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        paths = {ext: Path(f"{self.prefix}.{ext}") for ext in ("bin", "idx", "json")}
        for path in paths.values():
            if not path.is_file():
                raise DataError(f"{path}: missing; expected PREFIX.bin/.idx/.json written by data_tools/pack_pile.py")
        try:
            self.meta = json.loads(paths["json"].read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{paths['json']}: corrupt metadata ({e}); re-run pack_pile.py") from None
        missing = [k for k in META_KEYS if not isinstance(self.meta, dict) or k not in self.meta]
        if missing:
            raise DataError(f"{paths['json']}: metadata lacks {', '.join(missing)}; re-run pack_pile.py")

        with open(paths["idx"], "rb") as f:
            raw = f.read(HEADER_SIZE)
        if len(raw) < HEADER_SIZE or raw[:8] != MAGIC:
            raise DataError(f"{paths['idx']}: not a packed index (bad or truncated header)")
        _, version, width, self.seq_len, self.num_rows, self.num_pieces, self.max_token_id = HEADER.unpack_from(raw)
        if version != VERSION or width not in (2, 4):
            raise DataError(
                f"{paths['idx']}: index version {version} with {width}-byte tokens; "
                f"this code reads version {VERSION} with 2 or 4; re-run pack_pile.py"
            )
        n = self.num_rows
        idx_size = HEADER_SIZE + 8 * (n + 1) * 2 + 4 * n + 4 * self.num_pieces
        if paths["idx"].stat().st_size != idx_size:
            raise DataError(
                f"{paths['idx']}: {paths['idx'].stat().st_size} bytes, expected {idx_size}; "
                f"the file is truncated or corrupt, re-run pack_pile.py"
            )
        bin_size = n * self.seq_len * width
        if paths["bin"].stat().st_size != bin_size:
            raise DataError(
                f"{paths['bin']}: {paths['bin'].stat().st_size} bytes, expected {bin_size} "
                f"({n} rows of {self.seq_len} tokens); the file is truncated or from another pack"
            )
        if (self.meta["seq_len"], self.meta["rows"]) != (self.seq_len, n):
            raise DataError(
                f"{paths['json']}: says {self.meta['rows']} rows of {self.meta['seq_len']} tokens but "
                f"{paths['idx']} has {n} of {self.seq_len}; the files are from different packs"
            )
        self.dtype = np.dtype(np.uint16 if width == 2 else np.uint32)
        self.pad_id = int(self.meta["pad_id"])
        self.eod_id = int(self.meta["eod_id"])
        self.vocab_size = int(self.meta["vocab_size"])
        self._maps = None

    def verify(self) -> dict:
        """Check the files against the fingerprint in PREFIX.json; returns the fingerprint.

        Reads every byte (as fast as the disk: XXH3). A pack from before fingerprints has none: its
        fingerprint is computed, and its largest token id found in the same pass, so an id beyond
        the index header's is still caught. Raises DataError naming the file that differs."""
        expected = self.meta.get("fingerprint")
        largest = 0

        def scan(block):
            nonlocal largest
            ids = np.frombuffer(block, self.dtype, count=len(block) // self.dtype.itemsize)
            if ids.size:
                largest = max(largest, int(ids.max()))

        got = {
            "algorithm": ALGORITHM,
            "bin": file_digest(f"{self.prefix}.bin", on_block=None if expected else scan),
            "idx": file_digest(f"{self.prefix}.idx"),
        }
        if expected is None:
            if largest > self.max_token_id:
                raise DataError(
                    f"{self.prefix}.bin: holds token id {largest}, its index says the largest is "
                    f"{self.max_token_id}; the file is damaged: re-run pack_pile.py"
                )
            return got
        for ext in ("bin", "idx"):
            if expected.get("algorithm") != ALGORITHM or got[ext] != expected.get(ext):
                raise DataError(
                    f"{self.prefix}.{ext}: its content does not match the fingerprint in "
                    f"{self.prefix}.json; the file changed after packing (damaged or replaced): "
                    f"re-run pack_pile.py"
                )
        return got

    def check_ids(self, rows, limit: int) -> None:
        """Raise DataError, naming the file and the row, when one of `rows` holds a token id >= `limit`
        (what an embedding would index out of range; on a GPU a device-side assert)."""
        rows = np.asarray(rows)
        if rows.size == 0:
            return
        largest = self._arrays()["tokens"][rows].max(axis=1)
        bad = np.flatnonzero(largest >= limit)
        if bad.size:
            raise DataError(
                f"{self.prefix}.bin: row {int(rows[bad[0]])} holds token id {int(largest[bad[0]])}, "
                f"beyond the model's vocabulary of {limit}; the file changed after it was "
                f"verified: re-run pack_pile.py"
            )

    def _arrays(self) -> dict:
        """The memory maps of this process (made on first use)."""
        if self._maps is None:
            n, idx = self.num_rows, f"{self.prefix}.idx"
            at = HEADER_SIZE + 8 * (n + 1)  # row_offsets are implied by seq_len; not needed for reading
            doc_ptr = np.memmap(idx, np.uint64, "r", offset=at, shape=(n + 1,))
            at += 8 * (n + 1)
            row_tokens = np.memmap(idx, np.uint32, "r", offset=at, shape=(n,))
            at += 4 * n
            doc_starts = (
                np.memmap(idx, np.uint32, "r", offset=at, shape=(self.num_pieces,))
                if self.num_pieces
                else np.zeros(0, np.uint32)
            )
            tokens = np.memmap(f"{self.prefix}.bin", self.dtype, "r", shape=(n, self.seq_len))
            self._maps = {"tokens": tokens, "doc_ptr": doc_ptr, "row_tokens": row_tokens, "doc_starts": doc_starts}
        return self._maps

    def __getstate__(self):
        return {**self.__dict__, "_maps": None}  # each process maps the files itself

    def __len__(self) -> int:
        return self.num_rows

    def _row(self, i) -> int:
        i = int(i)
        if not -self.num_rows <= i < self.num_rows:
            raise IndexError(f"row {i} out of range for {self.num_rows} rows of {self.prefix}")
        return i % self.num_rows

    def __getitem__(self, i) -> np.ndarray:
        """(seq_len,) token ids of row i (uint16 or uint32), a read-only view of the mapped file."""
        return self._arrays()["tokens"][self._row(i)].view(np.ndarray)

    def loss_mask(self, i) -> np.ndarray:
        """(seq_len,) bool: True on document tokens (EOD included), False on padding."""
        return np.arange(self.seq_len) < self._arrays()["row_tokens"][self._row(i)]

    def doc_boundaries(self, i) -> np.ndarray:
        """int64 start offsets of the documents (or document pieces) in row i; the first is 0."""
        a, i = self._arrays(), self._row(i)
        return a["doc_starts"][int(a["doc_ptr"][i]) : int(a["doc_ptr"][i + 1])].astype(np.int64)


class RowSampler:
    """The global order of rows: `batch(step)` is the same `global_batch` row indices for a step
    whatever the number of data-parallel ranks, so a run resumed at step k sees exactly the rows an
    uninterrupted run would.

    seed None: rows in packed order; an int: a seeded permutation, a new one for each pass.
    A pass has `steps_per_pass = num_rows // global_batch` steps (drop_last, the rows left over are
    skipped) or ceil(num_rows / global_batch) (drop_last=False, the last batch is completed with the
    first rows of the pass); a pass shorter than one batch repeats rows to fill it. Iterating yields
    one pass (`epochs` passes if asked) from `start_step`; `batch(step)` accepts any step, steps past
    the end of a pass continue into the next.
    """

    def __init__(
        self,
        num_rows: int,
        global_batch: int,
        seed: int | None = None,
        start_step: int = 0,
        drop_last: bool = True,
        epochs: int = 1,
    ):
        if num_rows < 1 or global_batch < 1 or epochs < 1 or start_step < 0:
            raise ValueError(
                f"RowSampler: need num_rows >= 1, global_batch >= 1, epochs >= 1, start_step >= 0; "
                f"got {num_rows}, {global_batch}, {epochs}, {start_step}"
            )
        self.num_rows, self.global_batch, self.seed = num_rows, global_batch, seed
        self.start_step, self.drop_last, self.epochs = start_step, drop_last, epochs
        full, rest = divmod(num_rows, global_batch)
        self.steps_per_pass = max(1, full + (0 if drop_last or not rest else 1))
        self._cached = (None, None)  # (pass, order): one permutation is kept

    @property
    def num_steps(self) -> int:
        """Steps of `epochs` passes (iteration stops there; `batch` does not)."""
        return self.steps_per_pass * self.epochs

    def _order(self, p: int) -> np.ndarray:
        if self._cached[0] != p:
            order = (
                np.arange(self.num_rows)
                if self.seed is None
                else np.random.default_rng([self.seed, p]).permutation(self.num_rows)
            )
            self._cached = (p, order)
        return self._cached[1]

    def batch(self, step: int) -> np.ndarray:
        """int64 (global_batch,) row indices of `step` (0-based), the same on every rank and every run."""
        p, k = divmod(int(step), self.steps_per_pass)
        return self._order(p)[(k * self.global_batch + np.arange(self.global_batch)) % self.num_rows]

    def __len__(self) -> int:
        return max(0, self.num_steps - self.start_step)

    def __iter__(self):
        for step in range(self.start_step, self.num_steps):
            yield self.batch(step)


def rank_slice(global_rows: np.ndarray, dp_rank: int, dp_size: int) -> np.ndarray:
    """The contiguous share of a global batch that data-parallel rank `dp_rank` of `dp_size` trains on."""
    if not 0 <= dp_rank < dp_size or len(global_rows) % dp_size:
        raise ValueError(
            f"rank_slice: a batch of {len(global_rows)} rows cannot be split evenly for "
            f"dp_rank {dp_rank} of dp_size {dp_size}"
        )
    per = len(global_rows) // dp_size
    return global_rows[dp_rank * per : (dp_rank + 1) * per]


def collate(ds: PackedDataset, rows, device=None) -> dict:
    """Rows -> `input_ids` (b, s) int64 and `labels` (b, s) int64: the token ids, -100 on padding,
    on `device` if given.

    labels[t] = input_ids[t]; the model shifts them itself (position t predicts labels[t + 1]).
    To a GPU the rows go from pinned memory, asynchronously: a copy from pageable memory would
    wait for all the work queued before it and leave the GPU idle at the start of each step. The
    device is made current first, as a worker thread (`Prefetcher`) starts on GPU 0.
    """
    import torch

    ids = torch.from_numpy(np.stack([ds[r] for r in rows]).astype(np.int64))
    mask = torch.from_numpy(np.stack([ds.loss_mask(r) for r in rows]))
    batch = {"input_ids": ids, "labels": ids.masked_fill(~mask, -100)}
    if device is not None and torch.device(device).type == "cuda":
        with torch.cuda.device(device):
            return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return batch if device is None else {k: v.to(device) for k, v in batch.items()}


class Prefetcher:
    """`get(i)` returns `load(i)` and starts `load(i + 1)` in a worker thread, so the next step's
    batch (read, collated, pinned, its copy queued) is ready when the step asks for it. Indices
    from `limit` on are not loaded ahead; a `get` out of order loads in the caller's thread."""

    def __init__(self, load, limit: int | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self.load, self.limit = load, limit
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self.pending = None  # (index, future)

    def get(self, i: int):
        pending, self.pending = self.pending, None
        result = pending[1].result() if pending else None  # also waits for a pending load of another index
        if not pending or pending[0] != i:
            result = self.load(i)
        if self.limit is None or i + 1 < self.limit:
            self.pending = (i + 1, self.pool.submit(self.load, i + 1))
        return result

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------------
# Sources: local files or a streamed hub dataset, read through `datasets`
# --------------------------------------------------------------------------------------------------


def resolve_sources(inputs: list[str]) -> list[Path] | str:
    """The local files named by `inputs` (globs and folders expanded, in the order given), or the
    name of a hub dataset when `inputs` is one name that is not a local path."""
    files = []
    for src in inputs:
        if any(c in src for c in "*?["):
            matches = sorted(glob.glob(os.path.expanduser(src), recursive=True))
            if not matches:
                raise DataError(f"--input {src}: no file matches")
        elif Path(src).expanduser().is_dir():
            matches = sorted(str(p) for p in Path(src).expanduser().iterdir() if p.name.endswith(LOCAL_SUFFIXES))
            if not matches:
                raise DataError(f"--input {src}: the folder holds no {'/'.join(LOCAL_SUFFIXES)} file")
        elif (
            Path(src).expanduser().exists()
            or src.endswith(LOCAL_SUFFIXES)
            or src.startswith(("/", ".", "~"))
            or src.count("/") > 1
        ):
            matches = [os.path.expanduser(src)]
        else:  # 'owner/name' or 'name' that is not a local path: a hub dataset
            if len(inputs) > 1:
                raise DataError(f"--input {src}: a hub dataset must be the only --input (got {len(inputs)})")
            return src
        for m in matches:
            path = Path(m)
            if not path.is_file():
                raise DataError(f"--input {m}: no such file")
            if not path.name.endswith(LOCAL_SUFFIXES):
                raise DataError(f"--input {m}: unsupported file type; expected {', '.join(LOCAL_SUFFIXES)}")
            files.append(path)
    return files


@contextlib.contextmanager
def _quiet_datasets():
    """Silence `datasets`' own error logging while reading: our DataError is the one message."""
    from datasets.utils import logging as ds_logging

    level = ds_logging.get_verbosity()
    ds_logging.set_verbosity(ds_logging.CRITICAL + 10)
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _open_text(path: Path):
    if path.name.endswith(".zst"):
        import zstandard

        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")), encoding="utf-8")
    return open(path, encoding="utf-8")


def _check_zst(path: Path) -> None:
    """Raise DataError when a .zst file is corrupt or truncated: a zstd stream cut at a frame's middle
    reads as a shorter file without complaint, so every frame is checked to its end (output discarded)."""
    import zstandard

    with open(path, "rb") as f:
        frame = zstandard.ZstdDecompressor().decompressobj()
        try:
            while chunk := f.read(1 << 22):
                frame.decompress(chunk)
                while frame.eof and frame.unused_data:  # the next frame starts inside this chunk
                    rest, frame = frame.unused_data, zstandard.ZstdDecompressor().decompressobj()
                    frame.decompress(rest)
        except zstandard.ZstdError as e:
            raise DataError(f"{path}: corrupt zstd data ({_first_line(e)})") from None
    if not frame.eof:
        raise DataError(f"{path}: truncated (the zstd stream ends inside a frame)")


def _jsonl_problem(path: Path, text_key: str, error: Exception | None = None) -> str:
    """'file:line: what is wrong' for the first bad line of a .jsonl(.zst) file."""
    try:
        with _open_text(path) as handle:
            for n, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    return f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})"
                if not isinstance(record, dict):
                    return f"{path}:{n}: expected a JSON object per line, got {type(record).__name__}"
                if not isinstance(record.get(text_key), str):
                    what = "no field" if record.get(text_key) is None else "a non-string field"
                    return f"{path}:{n}: {what} '{text_key}' (keys: {', '.join(record) or 'none'}; set --text-key)"
    except Exception as e:  # undecodable bytes, a corrupt .zst stream
        return f"{path}: cannot be read ({_first_line(e)})"
    return f"{path}: cannot be read as JSON lines ({_first_line(error) if error else 'no bad line found'})"


def _json_problem(path: Path, text_key: str, error: Exception) -> str:
    """'file:line: what is wrong' for a .json file that `datasets` cannot read."""
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines in a .json file
            return _jsonl_problem(path, text_key, error)
        return f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})"
    except Exception as e:
        return f"{path}: cannot be read ({_first_line(e)})"
    return f"{path}: expected a list of objects with a '{text_key}' field, or JSON lines ({_first_line(error)})"


def _file_documents(path: Path, text_key: str):
    """Document texts of one local file, in file order. A .txt file has one document per non-empty line."""
    from datasets import load_dataset

    name = path.name
    builder = "parquet" if name.endswith(".parquet") else "text" if name.endswith(".txt") else "json"
    key = "text" if builder == "text" else text_key
    lines = ".jsonl" in name
    if path.stat().st_size == 0:
        return
    if name.endswith(".zst"):
        _check_zst(path)
    options = {}
    if builder == "parquet":  # read only the text column, and say so when it is not there
        import pyarrow.parquet as pq

        try:
            columns = pq.read_schema(path).names
        except Exception as e:
            raise DataError(f"{path}: cannot be read ({_first_line(e)})") from None
        if key not in columns:
            raise DataError(f"{path}: no column '{key}' (columns: {', '.join(columns)}; set --text-key)")
        options["columns"] = [key]
    try:
        with _quiet_datasets():
            records = load_dataset(builder, data_files=str(path), split="train", streaming=True, **options)
            for n, record in enumerate(records, 1):
                text = record.get(key)
                if not isinstance(text, str):
                    if lines:
                        raise DataError(_jsonl_problem(path, key))
                    what = "no field" if text is None else "a non-string field"
                    raise DataError(
                        f"{path}: record {n} has {what} '{key}' (keys: {', '.join(record)}; set --text-key)"
                    )
                if builder == "text" and not text.strip():
                    continue
                yield text
    except DataError:
        raise
    except Exception as e:  # pyarrow/datasets errors on malformed files
        if builder == "json":
            raise DataError(_jsonl_problem(path, key, e) if lines else _json_problem(path, key, e)) from None
        raise DataError(f"{path}: cannot be read ({_first_line(e)})") from None


def _hub_documents(name: str, text_key: str):
    """Document texts of a hub dataset's train split, streamed."""
    from datasets import load_dataset

    n = 0
    try:
        with _quiet_datasets():
            for n, record in enumerate(load_dataset(name, split="train", streaming=True), 1):
                text = record.get(text_key)
                if not isinstance(text, str):
                    raise DataError(
                        f"--input {name}: document {n} has no string field '{text_key}' "
                        f"(keys: {', '.join(record)}; set --text-key)"
                    )
                yield text
    except DataError:
        raise
    except Exception as e:  # offline, no such dataset, a broken stream
        raise DataError(
            f"--input {name}: cannot read this hub dataset after {n} documents ({_first_line(e)})"
        ) from None


def iter_documents(inputs: list[str], text_key: str = "text"):
    """Document texts from local files (in the order given) or a streamed hub dataset."""
    sources = resolve_sources(inputs)
    if isinstance(sources, str):
        yield from _hub_documents(sources, text_key)
    else:
        for path in sources:
            yield from _file_documents(path, text_key)


def select_documents(texts, num_docs: int | None = None, fraction: float | None = None, seed: int = 0):
    """A deterministic subset: each document kept with probability `fraction` (a `seed`ed draw per
    document, in source order), then the first `num_docs` of those."""
    rng = random.Random(seed)
    kept = 0
    if num_docs == 0:
        return
    for text in texts:
        if fraction is not None and rng.random() >= fraction:
            continue
        yield text
        kept += 1
        if num_docs is not None and kept >= num_docs:
            return


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------


class Tokenizer:
    """A fast tokenizer (hub name, folder or tokenizer.json) or a sentencepiece .model, with its EOD id.

    `encode(texts)` -> one uint32 array per text, the EOD appended.
    """

    def __init__(self, name: str | os.PathLike):
        self.name = str(name)
        self._sp = self._backend = self._hf = None
        if self.name.endswith(".model"):
            self._load_sentencepiece()
        elif self.name.endswith(".json"):
            self._load_tokenizer_json()
        else:
            self._load_pretrained()
        if self.eod_id is None:
            raise DataError(
                f"--tokenizer {self.name}: no end-of-document token (eos_token or one of {', '.join(EOD_CANDIDATES)})"
            )

    def _load_sentencepiece(self) -> None:
        import sentencepiece as spm

        if not Path(self.name).is_file():
            raise DataError(f"--tokenizer {self.name}: no such file")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.name)
        except Exception as e:
            raise DataError(f"--tokenizer {self.name}: not a sentencepiece model ({_first_line(e)})") from None
        self.vocab_size = self._sp.get_piece_size()
        self.eod_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None

    def _load_tokenizer_json(self) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        if not Path(self.name).is_file():
            raise DataError(f"--tokenizer {self.name}: no such file")
        try:
            self._backend = RustTokenizer.from_file(self.name)
        except Exception as e:
            raise DataError(f"--tokenizer {self.name}: not a tokenizers file ({_first_line(e)})") from None
        self.vocab_size = self._backend.get_vocab_size(with_added_tokens=True)
        self.eod_id = next(
            (self._backend.token_to_id(t) for t in EOD_CANDIDATES if self._backend.token_to_id(t) is not None), None
        )

    def _load_pretrained(self) -> None:
        from transformers import AutoTokenizer

        folder = Path(self.name).expanduser()
        if self.name.startswith(("/", ".", "~")) and not folder.exists():
            raise DataError(f"--tokenizer {self.name}: no such folder")
        if folder.is_dir() and not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            raise DataError(f"--tokenizer {self.name}: the folder has no tokenizer.json or tokenizer_config.json")
        try:
            self._hf = AutoTokenizer.from_pretrained(os.path.expanduser(self.name))
        except Exception as e:
            raise DataError(f"--tokenizer {self.name}: cannot load ({_first_line(e)})") from None
        self._backend = getattr(self._hf, "backend_tokenizer", None)  # fast: encode without transformers' checks
        self.vocab_size = len(self._hf)
        vocab = self._hf.get_vocab()
        eod = self._hf.eos_token_id
        self.eod_id = eod if eod is not None else next((vocab[t] for t in EOD_CANDIDATES if t in vocab), None)

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text with the EOD appended (uint32)."""
        if self._sp is not None:
            ids = self._sp.encode(texts)
        elif self._backend is not None:
            ids = [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=False)]
        else:
            ids = self._hf(texts, add_special_tokens=False)["input_ids"]
        return [np.array(x + [self.eod_id], dtype=np.uint32) for x in ids]


_WORKER = {}


def _init_worker(name: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    try:
        _WORKER["tokenizer"] = Tokenizer(name)
    except Exception as e:  # reported by the first task: a failing initializer would be retried forever
        _WORKER["error"] = e


def _encode_in_worker(texts: list[str]) -> list[np.ndarray]:
    if "error" in _WORKER:
        raise _WORKER["error"]
    return _WORKER["tokenizer"].encode(texts)


def _batched(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def encode_documents(texts, tokenizer: Tokenizer, workers: int = 1):
    """Token arrays (EOD appended) of `texts`, in order: the same for any number of `workers`.

    With workers > 1, batches go to a pool of processes with a bounded number in flight, so reading
    never runs far ahead of tokenizing (memory stays flat on a streamed corpus)."""
    batches = _batched(texts, ENCODE_BATCH)
    if workers <= 1:
        for batch in batches:
            yield from tokenizer.encode(batch)
        return
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers, _init_worker, (tokenizer.name,)) as pool:
        pending = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_in_worker, (batch,)))
            if len(pending) >= 4 * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


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
    tmp = {ext: path.with_name(path.name + ".tmp") for ext, path in final.items()}
    try:
        final["bin"].parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--out {out_prefix}: cannot create {final['bin'].parent} ({e.strerror})") from None
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

    docs = documents()
    try:
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
