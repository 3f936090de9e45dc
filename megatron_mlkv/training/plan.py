"""`RunPlan`: what a run's options decide before any process group exists.

Division of labour: the DeepSpeed JSON config owns batch size, ZeRO stage, precision and gradient
clipping; the run owns the model, the data order, the optimizer hyper-parameters (the paper's AdamW
recipe) and the schedule (linear warm-up over 20% of the steps, then cosine decay).

Every run sees the same global batches in the same order whatever the number of ranks: step k
always trains on rows `RowSampler.batch(k)`, split across data-parallel ranks, and the loss is the
mean over the real (non-padding) tokens of the whole global batch. So resuming at step k needs only
k, and ZeRO stages, DP sizes and TP sizes all optimise the same objective. `RUN_DIR/run_config.json`
records what must not change between a run and its resumption (`RunPlan.check_resumable`).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

from .. import parallel as tp
from ..config import MLKVConfig
from ..data import DataError, PackedDataset, RowSampler, collate, rank_slice
from ..data.tokenizer import tokenizer_fingerprint
from ..errors import CheckpointError, MLKVError, UptrainError, first_line
from ..integrity import atomic_write
from ..loading import read_config
from .distill import check_teacher, distill_settings
from .ds_config import load_ds_config
from .float8 import float8_problem
from .options import RunOptions

# run_config.json keys a resumed run must share with the run it continues
RESUME_KEYS = (
    "init",
    "data",
    "valid_data",
    "valid_rows",
    "tp",
    "seed",
    "global_batch",
    "total_steps",
    "lr",
    "min_lr_ratio",
    "warmup_ratio",
    "weight_decay",
    "distill_weight",
    "distill_temperature",
    "fp8",
)
# tests: float8 matmuls computed in float32 (torchao's emulation), so that --fp8 runs on the CPU
FP8_EMULATE = "MLKV_FP8_EMULATE"


def _open_data(prefix: str, flag: str, config: MLKVConfig) -> PackedDataset:
    """Open a packed prefix, verify its content against its fingerprint (`PackedDataset.verify`, kept
    as `ds.fingerprint`) and check that it fits the model."""
    try:
        ds = PackedDataset(prefix)
        ds.fingerprint = ds.verify()
    except (DataError, OSError) as e:
        raise UptrainError(f"{flag} {prefix}: {e}") from None
    if "fingerprint" not in ds.meta and int(os.environ.get("RANK", 0)) == 0:
        print(
            f"warning: {prefix}.json has no fingerprint (packed by an older version): its files cannot be "
            f"checked against the pack; re-run pack_pile.py to add one",
            file=sys.stderr,
            flush=True,
        )
    if ds.seq_len > config.max_position_embeddings:
        raise UptrainError(
            f"{flag} {prefix}: rows of {ds.seq_len} tokens exceed the model's "
            f"max_position_embeddings {config.max_position_embeddings}"
        )
    if ds.max_token_id >= config.vocab_size:
        raise UptrainError(
            f"{flag} {prefix}: token id {ds.max_token_id} is beyond the model's vocabulary "
            f"of {config.vocab_size}; pack with the model's tokenizer"
        )
    return ds


def _cuda_capability() -> tuple[int, int] | None:
    """This rank's GPU's compute capability, or None without one."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(int(os.environ.get("LOCAL_RANK", 0)))


class RunPlan:
    """What a run's options decide before any process group exists: the DeepSpeed config checked
    against the world and TP sizes, the model's config, the opened and verified data, the order of
    the rows (`sampler`), the validation rows and the number of steps. Bad options fail here, on
    every rank alike, with one line."""

    def __init__(self, args: RunOptions):
        self.args = args
        self.run_dir = Path(args.out)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.ds_config = load_ds_config(args.ds_config, self.world, args.tp)
        self.micro = self.ds_config["train_micro_batch_size_per_gpu"]
        self.gas = self.ds_config["gradient_accumulation_steps"]
        self.global_batch = self.ds_config["train_batch_size"]
        try:
            self.hf_config, self.config = read_config(args.init)
        except CheckpointError as e:
            raise UptrainError(f"--init {e}") from None
        if args.tp > 1:
            try:
                tp.check_tp_config(self.config, args.tp)
            except tp.TensorParallelError as e:
                raise UptrainError(f"--tp {args.tp}: {e}") from None
        self.data = _open_data(args.data, "--data", self.config)
        self.valid = _open_data(args.valid_data, "--valid-data", self.config) if args.valid_data else None
        self._check_tokenizer()
        self._plan_rows()
        self._check_evaluation()
        self.distill = distill_settings(args)  # (A, T) or None
        self.teacher_fingerprint = (
            check_teacher(args.distill_from, self.config, args.init, self.data.seq_len) if self.distill else None
        )
        self.fp8_emulate = os.environ.get(FP8_EMULATE) == "1"
        if args.fp8:
            problem = float8_problem(args.fp8, args.tp, (9, 0) if self.fp8_emulate else _cuda_capability())
            if problem:
                raise UptrainError(problem)

    def _check_tokenizer(self) -> None:
        """--data packed with --init's tokenizer (the same ids for the same tokens), unless
        --allow-other-tokenizer; packs made before their tokenizer was recorded, and an --init without
        tokenizer files, have nothing to compare."""
        packed = self.data.meta.get("tokenizer_fingerprint")
        if packed is None or self.args.allow_other_tokenizer:
            return
        try:
            mine = tokenizer_fingerprint(self.args.init)
        except DataError as e:
            raise UptrainError(f"--init {self.args.init}: its tokenizer does not load ({e})") from None
        if mine is not None and mine != packed:
            raise UptrainError(
                f"--data {self.args.data} was packed with another tokenizer ({self.data.meta['tokenizer']}) than the "
                f"one of --init {self.args.init}: the ids name other tokens; pack with --init's tokenizer, or pass "
                f"--allow-other-tokenizer"
            )

    def _check_evaluation(self) -> None:
        """With --eval-tasks, what evaluating each checkpoint needs, before step 1 rather than at the first
        checkpoint: the tasks exist (lm-eval's or --eval-include-path's) and --init's tokenizer loads."""
        a = self.args
        if not a.eval_tasks:
            return
        from transformers import AutoTokenizer

        from ..evaluation.harness import make_task_manager, parse_tasks

        try:
            make_task_manager(parse_tasks(a.eval_tasks), a.eval_include_path)
        except MLKVError as e:
            raise UptrainError(f"--eval-tasks {a.eval_tasks}: {e}") from None
        try:
            AutoTokenizer.from_pretrained(a.init, trust_remote_code=True)  # our folder's own config code
        except Exception as e:  # no tokenizer files, a damaged one
            raise UptrainError(
                f"--eval-tasks needs the tokenizer of --init {a.init}, which does not load ({first_line(e)}); "
                f"convert from a base with tokenizer files, or copy them in"
            ) from None

    def _plan_rows(self) -> None:
        args, n = self.args, len(self.data)
        if args.valid_rows < 0:
            raise UptrainError(f"--valid-rows {args.valid_rows} must be >= 0")
        for flag, value in (("--train-iters", args.train_iters), ("--train-tokens", args.train_tokens)):
            if value is not None and value < 1:
                raise UptrainError(f"{flag} {value} must be at least 1")
        if self.valid is not None:
            self.valid_rows = np.arange(min(len(self.valid), args.valid_rows or len(self.valid)))
            train_rows = n
        else:
            if args.valid_rows >= n:
                raise UptrainError(f"--valid-rows {args.valid_rows} leaves no training rows of the {n} in --data")
            self.valid_rows = np.arange(n - args.valid_rows, n)
            train_rows = n - args.valid_rows
        self.sampler = RowSampler(train_rows, self.global_batch, seed=args.data_seed)
        steps_per_pass = train_rows // self.global_batch
        if args.train_iters is not None:
            total = args.train_iters
        elif args.train_tokens is not None:
            total = math.ceil(args.train_tokens / (self.global_batch * self.data.seq_len))
        else:
            total = steps_per_pass
        if total < 1 or (steps_per_pass < 1 and args.train_iters is None and args.train_tokens is None):
            raise UptrainError(
                f"--data {args.data}: {train_rows} training rows make no global batch of "
                f"{self.global_batch} rows (micro-batch {self.micro} x accumulation {self.gas} "
                f"x data-parallel {self.world // args.tp})"
            )
        self.total_steps = total

    def micro_batches(self, step: int, dp_rank: int, dp_size: int, device: torch.device):
        """Data-parallel rank `dp_rank`'s `gas` micro-batches of step `step` on `device`, and the global
        batch's real-token count."""
        rows = self.sampler.batch(step)
        try:  # every rank checks the whole global batch, so all of them stop with the same line
            self.data.check_ids(rows, self.config.vocab_size)
        except DataError as e:
            raise UptrainError(f"--data: step {step + 1}: {e}") from None
        n_tokens = sum(int(self.data.loss_mask(r)[1:].sum()) for r in rows)
        mine = rank_slice(rows, dp_rank, dp_size)
        batches = [collate(self.data, mine[i * self.micro : (i + 1) * self.micro], device) for i in range(self.gas)]
        return batches, max(1, n_tokens)

    def run_config(self) -> dict:
        a = self.args
        return {
            "init": str(Path(a.init).resolve()),
            "data": str(Path(a.data).resolve()),
            "valid_data": str(Path(a.valid_data).resolve()) if a.valid_data else None,
            "data_fingerprint": self.data.fingerprint,
            "allow_other_tokenizer": a.allow_other_tokenizer,
            "valid_data_fingerprint": self.valid.fingerprint if self.valid is not None else None,
            "valid_rows": a.valid_rows,
            "tp": a.tp,
            "seed": a.seed,
            "global_batch": self.global_batch,
            "total_steps": self.total_steps,
            "lr": a.lr,
            "min_lr_ratio": a.min_lr_ratio,
            "warmup_ratio": a.warmup_ratio,
            "weight_decay": a.weight_decay,
            "distill_from": str(Path(a.distill_from).resolve()) if a.distill_from else None,
            "teacher_fingerprint": self.teacher_fingerprint,
            "distill_weight": self.distill[0] if self.distill else None,
            "distill_temperature": self.distill[1] if self.distill else None,
            "fp8": a.fp8,
            "world_size": self.world,
            "micro_batch": self.micro,
            "gradient_accumulation": self.gas,
            "seq_len": self.data.seq_len,
            "ds_config": self.ds_config,
            "layout": self.config.layout.to_dict(),
        }

    def check_resumable(self) -> None:
        """Refuse a run folder that holds a run with other settings or data; record them (rank 0) in a new one."""
        path = self.run_dir / "run_config.json"
        current = self.run_config()
        if path.exists():
            saved = json.loads(path.read_text())
            # the data's content first (data that changed also changes the step count); runs started
            # before fingerprints were recorded have none to compare
            for name in ("data", "valid_data"):
                key = f"{name}_fingerprint"
                if key in saved and saved[key] != current[key]:
                    raise UptrainError(
                        f"--out {self.run_dir} holds a run on other data: the files of --{name.replace('_', '-')} "
                        f"{getattr(self.args, name)} changed since it started (their fingerprint differs); "
                        f"restore them, or choose a new --out"
                    )
            if saved.get("teacher_fingerprint") != current["teacher_fingerprint"]:
                was = f"distilled from {saved['distill_from']}" if saved.get("distill_from") else "without distillation"
                now = (
                    f"--distill-from {self.args.distill_from}, whose weights differ (their fingerprint)"
                    if self.args.distill_from
                    else "no --distill-from"
                )
                raise UptrainError(
                    f"--out {self.run_dir} holds a run {was}; this command gives {now}; rerun with that "
                    f"teacher, or choose a new --out"
                )
            for key in RESUME_KEYS:
                if saved.get(key) != current[key]:
                    raise UptrainError(
                        f"--out {self.run_dir} holds a run with {key} = {saved.get(key)!r}, this "
                        f"command gives {current[key]!r}; rerun the same command to resume, or "
                        f"choose a new --out"
                    )
        elif self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(path, json.dumps(current, indent=2) + "\n")
