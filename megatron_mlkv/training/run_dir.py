"""The run folder's checkpoints: which are complete and intact, moving a damaged one aside, and
writing files atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..integrity import manifest_problem

COMPLETE = "COMPLETE"  # written last into each checkpoint folder, with the manifest of its files
LATEST = "latest"  # the newest complete checkpoint's tag, as DeepSpeed's own tools (zero_to_fp32.py) read it


def checkpoint_steps(ckpt_dir: Path, complete_only: bool = True) -> list[int]:
    """Steps of the checkpoint folders `step_N` under `ckpt_dir` (by default only the complete
    ones), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(
        int(d.name[5:])
        for d in ckpt_dir.iterdir()
        if d.is_dir()
        and d.name.startswith("step_")
        and d.name[5:].isdigit()
        and (not complete_only or (d / COMPLETE).is_file())
    )


def checkpoint_problem(folder: Path) -> str | None:
    """What is wrong with a complete checkpoint folder (a file missing, resized or changed since its
    manifest was written), or None. A checkpoint saved without a manifest has nothing to check."""
    try:
        marker = json.loads((folder / COMPLETE).read_text())
    except (OSError, ValueError) as e:
        return f"its {COMPLETE} marker is unreadable ({e.__class__.__name__})"
    files = marker.get("files") if isinstance(marker, dict) else None
    return None if files is None else manifest_problem(folder, files)


def newest_intact_checkpoint(ckpt_dir: Path) -> tuple[int | None, list[tuple[int, str]]]:
    """The newest complete checkpoint that matches its manifest (None if none does), and the newer
    complete ones that do not, each with its problem."""
    damaged = []
    for step in reversed(checkpoint_steps(ckpt_dir)):
        problem = checkpoint_problem(ckpt_dir / f"step_{step}")
        if problem is None:
            return step, damaged
        damaged.append((step, problem))
    return None, damaged


def move_aside(folder: Path) -> Path:
    """Rename a damaged checkpoint folder to `step_N.damaged` (`.damaged.2`, ...): kept for inspection,
    no longer a checkpoint, so neither resumed from nor counted by --keep-last."""
    aside, n = folder.with_name(f"{folder.name}.damaged"), 1
    while aside.exists():
        n += 1
        aside = folder.with_name(f"{folder.name}.damaged.{n}")
    os.replace(folder, aside)
    return aside
