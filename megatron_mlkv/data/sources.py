"""Where documents come from: local .jsonl/.jsonl.zst/.json/.parquet/.txt files or a streamed hub
dataset, read through `datasets`; a malformed file is one `DataError` naming file and line."""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import random
from pathlib import Path

from ..errors import first_line
from .dataset import DataError

DEFAULT_SOURCE = "EleutherAI/the_pile_deduplicated"
LOCAL_SUFFIXES = (".jsonl", ".jsonl.zst", ".json", ".parquet", ".txt")
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


def _open_bytes(path: Path):
    """A binary stream of the file's content, decompressed for .zst."""
    if path.name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))
    return open(path, "rb")


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
            raise DataError(f"{path}: corrupt zstd data ({first_line(e)})") from None
    if not frame.eof:
        raise DataError(f"{path}: truncated (the zstd stream ends inside a frame)")


def _jsonl_problem(path: Path, text_key: str, error: Exception | None = None) -> str:
    """'file:line: what is wrong' for the first bad line of a .jsonl(.zst) file."""
    try:
        with _open_bytes(path) as handle:
            for n, raw in enumerate(handle, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    return f"{path}:{n}: not UTF-8 (byte {e.start + 1} of the line is {raw[e.start]:#04x})"
                if not line.strip():
                    continue
                try:
                    record = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as e:
                    return f"{path}:{n}: malformed JSON ({e.msg}: column {e.colno})"
                if not isinstance(record, dict):
                    return f"{path}:{n}: expected a JSON object per line, got {type(record).__name__}"
                if not isinstance(record.get(text_key), str):
                    what = "no field" if record.get(text_key) is None else "a non-string field"
                    return f"{path}:{n}: {what} '{text_key}' (keys: {', '.join(record) or 'none'}; set --text-key)"
    except Exception as e:  # a corrupt .zst stream
        return f"{path}: cannot be read ({first_line(e)})"
    return f"{path}: cannot be read as JSON lines ({first_line(error) if error else 'no bad line found'})"


def _json_problem(path: Path, text_key: str, error: Exception) -> str:
    """'file:line: what is wrong' for a .json file that `datasets` cannot read."""
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines in a .json file
            return _jsonl_problem(path, text_key, error)
        return f"{path}:{e.lineno}: malformed JSON ({e.msg}: column {e.colno})"
    except Exception as e:
        return f"{path}: cannot be read ({first_line(e)})"
    return f"{path}: expected a list of objects with a '{text_key}' field, or JSON lines ({first_line(error)})"


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
            raise DataError(f"{path}: cannot be read ({first_line(e)})") from None
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
        raise DataError(f"{path}: cannot be read ({first_line(e)})") from None


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
        raise DataError(f"--input {name}: cannot read this hub dataset after {n} documents ({first_line(e)})") from None


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
