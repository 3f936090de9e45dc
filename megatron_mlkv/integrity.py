"""Files that are whole or absent: fast content checksums (the packed data's fingerprint, each
checkpoint's manifest) and atomic writes (a temporary sibling renamed over the target).

xxHash's XXH3-128 reads ~30 GB/s per core from memory (`python benchmarks/verify_speed.py`), so a
check is as fast as the disk: a 12 GB pack verifies in seconds, where SHA-256 would take a minute.
It finds damage (truncation, flipped bytes, a file from another pack or run), not tampering.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import xxhash

ALGORITHM = "xxh3_128"
BLOCK = 16 << 20  # bytes read per call: large enough to stream, small enough to stay in cache


def file_digest(path: str | os.PathLike, on_block=None) -> str:
    """The XXH3-128 hex digest of a file's bytes; `on_block(memoryview)` also sees every block."""
    h = xxhash.xxh3_128()
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            if on_block is not None:
                on_block(view[:n])
    return h.hexdigest()


def _files(folder: Path, exclude: tuple[str, ...]) -> list[str]:
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and str(p.relative_to(folder)) not in exclude
    )


def _digests(folder: Path, names: list[str], threads: int):
    """`file_digest` of each of `names` under `folder`, in order, hashed in parallel threads (xxhash
    releases the GIL)."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(lambda name: file_digest(folder / name), names))


def manifest(folder: str | os.PathLike, exclude: tuple[str, ...] = (), threads: int = 8) -> dict:
    """{relative path: {"size": bytes, ALGORITHM: digest}} for every file under `folder`."""
    folder = Path(folder)
    names = _files(folder, exclude)
    digests = _digests(folder, names, threads)
    return {name: {"size": (folder / name).stat().st_size, ALGORITHM: digest} for name, digest in zip(names, digests)}


def manifest_problem(folder: str | os.PathLike, expected: dict, threads: int = 8) -> str | None:
    """None when every file of `expected` (a `manifest`) is under `folder` with its size and digest,
    else what is wrong with the first file that differs: missing, another size, other content.
    Sizes are checked first, so a truncated file is found without reading anything."""
    folder = Path(folder)
    for name, entry in expected.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{name} is {size} bytes, {entry['size']} when saved"
    names = list(expected)
    for name, digest in zip(names, _digests(folder, names, threads)):
        if digest != expected[name][ALGORITHM]:
            return f"{name} does not match its checksum (its content changed after it was saved)"
    return None


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, data: dict) -> Path:
    """Write `data` as JSON so that `path` is either complete or untouched."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    return Path(path)


def atomic_write(path: str | os.PathLike, text: str) -> Path:
    """Write `text` so that `path` is either complete or untouched."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)
    return Path(path)
