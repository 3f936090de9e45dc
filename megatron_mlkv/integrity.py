"""Files that are whole or absent: fast content checksums (the packed data's fingerprint, each
checkpoint's manifest), atomic writes (a temporary sibling renamed over the target), ordinary file
modes, and one writer per output (`OutputLock`).

xxHash's XXH3-128 reads ~30 GB/s per core from memory (`python benchmarks/verify_speed.py`), so a
check is as fast as the disk: a 12 GB pack verifies in seconds, where SHA-256 would take a minute.
It finds damage (truncation, flipped bytes, a file from another pack or run), not tampering.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import xxhash

from .errors import MLKVError

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


def umask() -> int:
    """The process's umask, read without changing it where Linux says it (/proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore
    os.umask(mask)
    return mask


def ordinary_modes(folder: str | os.PathLike) -> Path:
    """Give `folder` and everything in it the modes a plain mkdir and open would (0777 and 0666 less
    the umask): a folder made by mkdtemp is private (0700) and transformers writes safetensors files
    0600, which nobody else on a shared machine could read."""
    folder, mask = Path(folder), umask()
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
    return folder


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


class OutputLocked(MLKVError):
    """Another process writes this output; the message names it and says what to do."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class OutputLock:
    """One writer per output (a run folder, a pack prefix): `path` is created exclusively and holds the
    writer's host, pid and start time. A second writer is refused in one line naming the first; a lock
    left by a process of this host that no longer runs (killed) is taken over, and said so. Held by
    this process (the same pid) it is taken again. Use as a context manager."""

    def __init__(self, path: str | os.PathLike, what: str):
        self.path, self.what, self.held = Path(path), what, False

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a dead writer's lock was taken over."""
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        note = None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text())
                except (OSError, ValueError):  # being written this instant, or damaged: look again
                    time.sleep(0.1)
                    holder = json.loads(self.path.read_text()) if self.path.exists() else {}
                if holder.get("host") == me["host"] and holder.get("pid") == me["pid"]:
                    return None  # this process's own: it stays until whoever took it releases it
                if holder.get("host") == me["host"] and not _alive(int(holder.get("pid", 0))):
                    self.path.unlink(missing_ok=True)
                    note = f"{self.what}: took over the lock of process {holder.get('pid')}, which no longer runs"
                    continue
                raise OutputLocked(
                    f"{self.what} is being written by process {holder.get('pid')} on {holder.get('host')} since "
                    f"{holder.get('started')} (lock {self.path}); wait for it to finish, or remove the lock if "
                    f"that process is gone"
                ) from None
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me) + "\n")
            self.held = True
            return note
        raise OutputLocked(f"{self.what}: its lock {self.path} keeps coming back; another writer races this one")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> OutputLock:
        note = self.acquire()
        if note:
            import sys

            print(note, file=sys.stderr, flush=True)
        return self

    def __exit__(self, *exc) -> None:
        self.release()
