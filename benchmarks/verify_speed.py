"""How long `uptrain.py` spends verifying its data before step 1: `PackedDataset.verify` on a synthetic
pack of --gb gigabytes (2048-token rows of random ids), next to plain reads and other digests.

    python benchmarks/verify_speed.py --gb 12 --dir /path/on/the/training/disk

Prints a table and writes it as JSON to --out (default: verify_speed.json in the system's temporary
folder; the results benchmarks/README.md cites are benchmarks/results/verify/verify_speed.json, written
only when named). The page cache is dropped before the cold pass when this process may (root);
otherwise that row says "warm".
"""

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_mlkv.data import HEADER, HEADER_SIZE, MAGIC, VERSION, PackedDataset  # noqa: E402
from megatron_mlkv.integrity import ALGORITHM, BLOCK, file_digest  # noqa: E402

SEQ = 2048


def write_pack(prefix: Path, gb: float) -> int:
    """A valid pack of random uint16 ids, one document per full row; returns its rows."""
    rows = int(gb * 1e9) // (SEQ * 2)
    rng = np.random.default_rng(0)
    with open(f"{prefix}.bin", "wb") as f:
        for start in range(0, rows, 16384):
            rng.integers(0, 50000, size=(min(16384, rows - start), SEQ), dtype=np.uint16).tofile(f)
    with open(f"{prefix}.idx", "wb") as f:
        f.write(HEADER.pack(MAGIC, VERSION, 2, SEQ, rows, rows, 49999).ljust(HEADER_SIZE, b"\0"))
        f.write((np.arange(rows + 1, dtype="<u8") * SEQ).tobytes())
        f.write(np.arange(rows + 1, dtype="<u8").tobytes())
        f.write(np.full(rows, SEQ, "<u4").tobytes())
        f.write(np.zeros(rows, "<u4").tobytes())
    meta = {
        "seq_len": SEQ,
        "rows": rows,
        "pad_id": 0,
        "eod_id": 0,
        "vocab_size": 50304,
        "max_token_id": 49999,
        "fingerprint": {
            "algorithm": ALGORITHM,
            "bin": file_digest(f"{prefix}.bin"),
            "idx": file_digest(f"{prefix}.idx"),
        },
    }
    Path(f"{prefix}.json").write_text(json.dumps(meta))
    return rows


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def read_only(path: str) -> None:
    buf = bytearray(BLOCK)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=12.0, help="size of the synthetic .bin (default 12)")
    p.add_argument("--dir", default=None, help="folder for the pack (default: the system's temporary folder)")
    p.add_argument(
        "--out",
        default=str(Path(tempfile.gettempdir()) / "verify_speed.json"),
        help="JSON output (default: the system's temporary folder, not the tracked results)",
    )
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        prefix = Path(tmp) / "pack"
        rows = write_pack(prefix, args.gb)
        size = Path(f"{prefix}.bin").stat().st_size + Path(f"{prefix}.idx").stat().st_size
        ds = PackedDataset(prefix)
        cold = drop_caches()
        results = [("verify (" + ("cold cache" if cold else "warm cache, could not drop it") + ")", timed(ds.verify))]
        results.append(("verify (warm cache)", timed(ds.verify)))
        results.append(("read only (warm cache)", timed(lambda: read_only(f"{prefix}.bin"))))
        sample = np.fromfile(f"{prefix}.bin", np.uint8, count=1 << 30)  # digests of 1 GiB, scaled to the pack
        for name, fn in (("sha256", hashlib.sha256), ("blake2b", hashlib.blake2b)):
            results.append(
                (f"{name} (in memory, scaled)", timed(lambda fn=fn: fn(sample).digest()) * size / sample.size)
            )
    print(f"pack: {rows:,} rows x {SEQ} tokens, {size / 1e9:.2f} GB (.bin + .idx), {os.cpu_count()} CPUs")
    print("| pass | seconds | GB/s |\n|---|---|---|")
    for name, seconds in results:
        print(f"| {name} | {seconds:.2f} | {size / seconds / 1e9:.1f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "bytes": size,
                "rows": rows,
                "seq_len": SEQ,
                "cpus": os.cpu_count(),
                "machine": platform.platform(),
                "cold_cache_dropped": cold,
                "seconds": dict(results),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
