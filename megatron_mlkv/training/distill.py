"""Distillation from a teacher (normally the base a run was converted from): its checks before step 1,
its identity, and the frozen copy the loss reads.

loss = (1 - A)·CE + A·T²·KL(teacher || student), both distributions at temperature T, on the tokens
that carry a label (`loss.distill_loss_sums`). The teacher is loaded in the training dtype, frozen
(no gradients, no optimizer state) and kept outside the module DeepSpeed wraps: under ZeRO-1/2/3 it
is replicated on every rank, as inference copies are (it is read once per micro-batch, forward only,
so partitioning it would add one all-gather of its weights per micro-batch to save 2 bytes per
parameter and rank); under tensor parallelism it is sharded with the student's plan, so the KL is
vocabulary-parallel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash
from torch import nn

from ..config import MLKVConfig
from ..data.tokenizer import tokenizer_fingerprint
from ..errors import MLKVError, UptrainError, first_line
from ..integrity import file_digest
from .options import DISTILL_TEMPERATURE, DISTILL_WEIGHT


@dataclass
class Distillation:
    """A frozen teacher and the loss's A (`weight`) and T (`temperature`); held by `engine.LossModel`
    as a plain attribute, so the teacher is no submodule DeepSpeed would partition or optimise.
    `compile`: compile the fused loss's elementwise part on GPUs (off with --no-compile)."""

    teacher: nn.Module
    weight: float = DISTILL_WEIGHT
    temperature: float = DISTILL_TEMPERATURE
    compile: bool = True


def weights_fingerprint(folder: str | Path) -> str:
    """XXH3-128 over the names and digests of a checkpoint folder's weight files: the teacher's identity."""
    from ..conversion.checkpoint_io import weight_files

    h = xxhash.xxh3_128()
    for path in weight_files(str(folder), local=True):
        h.update(f"{path.name}:{file_digest(path)}\n".encode())
    return h.hexdigest()


def distill_settings(args) -> tuple[float, float] | None:
    """(A, T) of a run's options, defaults filled in; None without --distill-from. One line for values
    out of range, or for A or T given without a teacher."""
    if args.distill_from is None:
        given = [
            f
            for f, v in (("--distill-weight", args.distill_weight), ("--distill-temperature", args.distill_temperature))
            if v is not None
        ]
        if given:
            raise UptrainError(f"{' and '.join(given)} without --distill-from: name the teacher to distill from")
        return None
    weight = DISTILL_WEIGHT if args.distill_weight is None else args.distill_weight
    temperature = DISTILL_TEMPERATURE if args.distill_temperature is None else args.distill_temperature
    if not 0.0 <= weight <= 1.0:
        raise UptrainError(f"--distill-weight {weight} must be between 0 (cross-entropy only) and 1 (KL only)")
    if not temperature > 0:
        raise UptrainError(f"--distill-temperature {temperature} must be positive")
    return weight, temperature


def teacher_folder(path: str) -> Path:
    """The teacher's folder: `path` itself, or for a hub name ('EleutherAI/pythia-160m-deduped') its
    snapshot in the Hugging Face cache, fetched once (weights, config and tokenizer files)."""
    from ..conversion.checkpoint_io import looks_local

    folder = Path(path).expanduser()
    if folder.is_dir() or looks_local(path):
        if not folder.is_dir():
            raise UptrainError(
                f"--distill-from {path}: no such folder; give the checkpoint to distill from (normally the base "
                f"of --init)"
            )
        return folder
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"]))
    except Exception as e:  # no network, unknown or gated repository
        raise UptrainError(
            f"--distill-from {path}: not a local folder, and the hub cannot provide it ({first_line(e)})"
        ) from None


def check_teacher(path: str, student: MLKVConfig, init: str, seq_len: int) -> str:
    """Refuse, in one line, a teacher that is missing, unreadable, of another vocabulary or tokenizer than
    the student (`--init`), or too short for the data's rows; returns its `weights_fingerprint`."""
    from ..evaluation.harness import read_model_config

    flag = f"--distill-from {path}"
    folder = teacher_folder(path)
    try:
        config, _ = read_model_config(folder)
        fingerprint = weights_fingerprint(folder)
    except MLKVError as e:
        raise UptrainError(f"{flag}: {e}") from None
    if config.vocab_size != student.vocab_size:
        raise UptrainError(
            f"{flag}: a vocabulary of {config.vocab_size} ids, --init {init} has {student.vocab_size}; "
            f"the teacher must share the student's tokenizer"
        )
    mine, theirs = tokenizer_fingerprint(init), tokenizer_fingerprint(folder)
    if mine is not None and theirs is not None and mine != theirs:
        raise UptrainError(
            f"{flag}: its tokenizer differs from that of --init {init} (the same {config.vocab_size} ids name "
            f"other tokens); distill from a model with the student's tokenizer"
        )
    if config.max_position_embeddings < seq_len:
        raise UptrainError(
            f"{flag}: max_position_embeddings {config.max_position_embeddings} is shorter than the data's "
            f"rows of {seq_len} tokens"
        )
    return fingerprint


def load_teacher(path: str, dtype: torch.dtype, device: torch.device, tp_group=None):
    """The teacher as a frozen `MLKVTransformer` in `dtype` on `device`: tensor-parallel over `tp_group`
    with the student's plan (the trainer compiles its layers as it does the student's)."""
    from .. import parallel as tp
    from ..loading import load_pretrained

    try:
        teacher = load_pretrained(teacher_folder(path), dtype=dtype)
    except MLKVError as e:
        raise UptrainError(f"--distill-from {path}: {e}") from None
    except Exception as e:  # a folder that passed the checks but cannot be read after all
        raise UptrainError(f"--distill-from {path}: cannot load ({first_line(e)})") from None
    teacher.requires_grad_(False).eval().to(device)
    if tp.group_size(tp_group) > 1:
        teacher = tp.parallelize(teacher, tp_group)
    return teacher
