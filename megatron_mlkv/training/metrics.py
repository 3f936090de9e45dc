"""What a run logs and how it measures itself: `MetricsLog` (metrics.jsonl and TensorBoard), the
matrix rate for MFU, device synchronisation and peak memory."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch

from ..integrity import atomic_write


class MetricsLog:
    """metrics.jsonl plus TensorBoard scalars (rank 0 only). On resume at step k, records after k
    (logged by the interrupted run after its last checkpoint) are dropped from both."""

    def __init__(self, run_dir: Path, start_step: int, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                if record.get("step", 0) <= start_step:
                    kept.append(line)
            atomic_write(self.path, "".join(f"{line}\n" for line in kept))
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self.file = open(self.path, "a")

    def log(self, record: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and value is not None:
                tag = key if "/" in key else f"{prefix}/{key}"
                self.tb.add_scalar(tag, value, record["step"])
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype) -> float:
    """The dense matrix-multiply rate measured on `device` (the MFU denominator)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 3
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
