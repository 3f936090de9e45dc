"""What training reads: `PackedDataset` (one packed prefix), `RowSampler` (the global order of rows),
`rank_slice`, `collate` and `Prefetcher`.

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
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from ..errors import MLKVError
from ..integrity import ALGORITHM, file_digest

MAGIC = b"MLKVPACK"
VERSION = 1
HEADER = struct.Struct("<8sIIIQQQ")  # magic, version, token bytes, seq_len, rows, pieces, max_token_id
HEADER_SIZE = 64  # the header is zero-padded so the columns after it are 8-byte aligned
META_KEYS = ("seq_len", "rows", "pad_id", "eod_id", "vocab_size", "max_token_id")


class DataError(MLKVError):
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
