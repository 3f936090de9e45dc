"""The tokenizer a pack is made with (a hub name, a local folder or a tokenizer.json) and the
worker processes that encode documents in parallel."""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

import numpy as np

from ..errors import first_line
from .dataset import DataError

EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eos|>")
ENCODE_BATCH = 256  # documents per tokenizer call (and per task of a worker process)
# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------


class Tokenizer:
    """A fast tokenizer (hub name, folder or tokenizer.json) or a sentencepiece .model, with its EOD id.

    `encode(texts)` -> one uint32 array per text, the EOD appended. `fingerprint`: its identity.
    `require_eod=False` loads one without an end-of-document token too (to compare it, not to pack).
    """

    def __init__(self, name: str | os.PathLike, require_eod: bool = True):
        self.name = str(name)
        self._sp = self._backend = self._hf = None
        if self.name.endswith(".model"):
            self._load_sentencepiece()
        elif self.name.endswith(".json"):
            self._load_tokenizer_json()
        else:
            self._load_pretrained()
        if self.eod_id is None and require_eod:
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
            raise DataError(f"--tokenizer {self.name}: not a sentencepiece model ({first_line(e)})") from None
        self.vocab_size = self._sp.get_piece_size()
        self.eod_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None

    def _load_tokenizer_json(self) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        if not Path(self.name).is_file():
            raise DataError(f"--tokenizer {self.name}: no such file")
        try:
            self._backend = RustTokenizer.from_file(self.name)
        except Exception as e:
            raise DataError(f"--tokenizer {self.name}: not a tokenizers file ({first_line(e)})") from None
        self.vocab_size = self._backend.get_vocab_size(with_added_tokens=True)
        self.eod_id = next(
            (self._backend.token_to_id(t) for t in EOD_CANDIDATES if self._backend.token_to_id(t) is not None), None
        )

    def _load_pretrained(self) -> None:
        from transformers import AutoTokenizer

        from ..hf import quiet_transformers

        folder = Path(self.name).expanduser()
        if self.name.startswith(("/", ".", "~")) and not folder.exists():
            raise DataError(f"--tokenizer {self.name}: no such folder")
        if folder.is_dir() and not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            raise DataError(f"--tokenizer {self.name}: the folder has no tokenizer.json or tokenizer_config.json")
        try:
            with quiet_transformers():  # a folder of ours: its config is read, as a plain one, to no end
                self._hf = AutoTokenizer.from_pretrained(os.path.expanduser(self.name))
        except Exception as e:
            raise DataError(f"--tokenizer {self.name}: cannot load ({first_line(e)})") from None
        self._backend = getattr(self._hf, "backend_tokenizer", None)  # fast: encode without transformers' checks
        self.vocab_size = len(self._hf)
        vocab = self._hf.get_vocab()
        eod = self._hf.eos_token_id
        self.eod_id = eod if eod is not None else next((vocab[t] for t in EOD_CANDIDATES if t in vocab), None)

    @property
    def fingerprint(self) -> str:
        """XXH3-128 of its vocabulary (every token and its id, added tokens included): equal for two
        tokenizers that give text the same ids, whatever files or padding settings they come with."""
        import xxhash

        if self._sp is not None:
            vocab = {self._sp.id_to_piece(i): i for i in range(self._sp.get_piece_size())}
        elif self._hf is not None:
            vocab = self._hf.get_vocab()
        else:
            vocab = self._backend.get_vocab(with_added_tokens=True)
        return xxhash.xxh3_128(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()).hexdigest()

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text with the EOD appended (uint32)."""
        if self._sp is not None:
            ids = self._sp.encode(texts)
        elif self._backend is not None:
            ids = [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=False)]
        else:
            ids = self._hf(texts, add_special_tokens=False)["input_ids"]
        return [np.array(x + [self.eod_id], dtype=np.uint32) for x in ids]


def tokenizer_fingerprint(folder: str | os.PathLike) -> str | None:
    """`Tokenizer.fingerprint` of a transformers folder's tokenizer; None when it has no tokenizer files."""
    folder = Path(folder)
    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    return Tokenizer(folder, require_eod=False).fingerprint


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


def train_tokenizer(corpus: Path, out_dir: Path, vocab_size: int = 512, max_chars: int | None = None) -> Path:
    """A byte-level BPE tokenizer trained on `corpus` (.jsonl; its first `max_chars` characters if
    given), saved as a transformers tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    eod = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[eod], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )

    def texts(f):
        seen = 0
        for line in f:
            text = json.loads(line)["text"]
            yield text
            seen += len(text)
            if max_chars is not None and seen >= max_chars:
                return

    with open(corpus) as f:
        tok.train_from_iterator(texts(f), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eod, bos_token=eod, unk_token=eod)
    fast.save_pretrained(out_dir)
    return out_dir
