"""Uptraining with DeepSpeed: the loop behind `deepspeed launch/uptrain.py`.

Division of labour: the DeepSpeed JSON config owns batch size, ZeRO stage, precision and gradient
clipping; this module owns the model, the data order, the optimizer hyper-parameters (the paper's
AdamW recipe) and the schedule (linear warm-up over 20% of the steps, then cosine decay).

Every run sees the same global batches in the same order whatever the number of ranks: step k
always trains on rows `RowSampler.batch(k)`, split across data-parallel ranks, and the loss is the
mean over the real (non-padding) tokens of the whole global batch. So resuming at step k needs only
k, and ZeRO stages, DP sizes and TP sizes all optimise the same objective.

Run folder:
    RUN_DIR/.lock                    held while a command runs on RUN_DIR (its host and pid)
    RUN_DIR/run_config.json          what must not change between a run and its resumption
    RUN_DIR/metrics.jsonl            one JSON object per logged step (and per validation)
    RUN_DIR/tensorboard/             the same scalars as TensorBoard events
    RUN_DIR/checkpoints/step_N/      DeepSpeed checkpoints; complete once `step_N/COMPLETE` exists (it holds
                                     the manifest of the folder's files: sizes and XXH3 checksums)
    RUN_DIR/checkpoints/latest       the newest complete checkpoint's tag (DeepSpeed's zero_to_fp32.py reads it)
    RUN_DIR/hf/step_N/               transformers export of each checkpoint
    RUN_DIR/eval/step_N.json         lm-evaluation-harness results (with --eval-tasks)

With --distill-from the loss is (1 - A)·CE + A·T²·KL(teacher || student) (`distill.py`); both terms are
logged beside it (`ce`, `kl`), validation reports the CE and the KL at temperature 1 (`valid_kl`),
and run_config.json records the teacher's weights fingerprint, so a resume with another teacher is refused.

`RunPlan(args)` is what the options decide before any process group exists (DeepSpeed config,
model config, data, row order, step count); `Trainer(args)` builds on it everything a run needs
(process groups, the resumed engine, metrics, the data prefetcher), and `Trainer.train()` only loops.

Why one file of ~600 lines: `Trainer` holds one run's state (engine, data order, run folder), and
its set-up, loop, validation, checkpoint choice, save, resume and export all read and change it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .. import parallel as tp
from ..config import MLKVConfig
from ..data import DataError, PackedDataset, Prefetcher, RowSampler, collate, rank_slice
from ..data.tokenizer import tokenizer_fingerprint
from ..errors import MLKVError, as_disk_full, first_line
from ..hf import (
    CheckpointError,
    export_pretrained,
    load_pretrained,
    read_config,
    remove_partial_exports,
    special_token_ids,
)
from ..integrity import OutputLock, atomic_write, manifest
from .deepspeed_patches import no_shared_memory_allreduce
from .distill import Distillation, check_teacher, distill_settings, load_teacher
from .ds_config import UptrainError, load_ds_config
from .engine import compile_blocks, make_engine
from .metrics import MetricsLog, matmul_flops_per_s, max_memory_bytes, sync
from .options import RunOptions
from .packing import unpack_tensors, unpacked_checkpoint
from .run_dir import (
    COMPLETE,
    LATEST,
    checkpoint_steps,
    move_aside,
    newest_intact_checkpoint,
)

LOCK = ".lock"
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
)


class NonFiniteLoss(MLKVError):
    """The loss became NaN or infinite; training stops and the last good checkpoint stays."""

    exit_code = 3


def _fault(kind: str, step: int) -> bool:
    """Test hook: MLKV_FAULT='kill-in-save@N', 'kill-before-eval@N' or 'nan-loss@N' injects that fault at step N."""
    spec = os.environ.get("MLKV_FAULT", "")
    return spec == f"{kind}@{step}"


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


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


def single_process_env() -> None:
    """Environment for a single process started without the deepspeed launcher (rank 0 of 1, a free
    port); unchanged when a launcher set it."""
    if "RANK" not in os.environ:
        from ..cli import free_port

        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )


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

        from ..evaluate import make_task_manager, parse_tasks

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


class Trainer(RunPlan):
    """One uptraining run on this rank: `Trainer(args)` builds it (the plan, process groups, the engine
    resumed from the newest intact checkpoint, metrics, the prefetcher), `train()` runs the remaining
    steps; `close()` (also on failure) stops the prefetcher and flushes the metrics."""

    def __init__(self, args: RunOptions):
        import deepspeed

        super().__init__(args)
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.check_resumable()
        self.train_dtype = (
            torch.bfloat16
            if self.ds_config.get("bf16", {}).get("enabled")
            else torch.float16
            if self.ds_config.get("fp16", {}).get("enabled")
            else torch.float32
        )
        if self.rank == 0:
            for partial in remove_partial_exports(self.run_dir / "hf"):
                print(f"removed {partial}, an export a killed run left unfinished", flush=True)
        no_shared_memory_allreduce()
        try:
            deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
        except dist.DistNetworkError as e:
            if "EADDRINUSE" not in str(e) and "address already in use" not in str(e):
                raise
            from ..cli import free_port

            port = os.environ.get("MASTER_PORT", "29500")
            raise UptrainError(
                f"the rendezvous port {port} is taken (another DeepSpeed job on this machine?): start with "
                f"`deepspeed --master_port {free_port()} ...` (any free port)"
            ) from None
        self.groups = tp.init_groups(args.tp)
        dist.barrier()
        resume_from = self._choose_checkpoint()
        self.engine = self._build_engine()
        self.start = self._resume(resume_from)
        self.metrics = MetricsLog(self.run_dir, self.start, enabled=self.rank == 0)
        self.peak_flops = matmul_flops_per_s(
            self.device, torch.float32 if self.device.type == "cpu" else self.train_dtype
        )
        # the next step's batches are collated while this one runs
        self.batches = Prefetcher(self._micro_batches, self.total_steps)

    def close(self) -> None:
        self.batches.close()
        self.metrics.close()

    def _build_engine(self):
        torch.manual_seed(self.args.seed)
        model = load_pretrained(self.args.init, dtype=torch.float32)
        if self.args.activation_checkpointing:
            model.gradient_checkpointing = True
        if self.device.type == "cuda":
            model.to(self.device)
        if self.args.tp > 1:
            model = tp.parallelize(model, self.groups.tp_group)
        # Not with --tp: compiled
        # blocks around the TP region's autograd collectives gave wrong gradients on 2 H200s
        # (losses drifted from TP=1 after the first step; eager TP=2 matches within bf16 noise).
        if self.args.compile and self.device.type == "cuda" and self.args.tp == 1:
            compile_blocks(model)
        a = self.args
        distill = None
        if self.distill:
            compiled = a.compile and self.device.type == "cuda"
            tp_group = self.groups.tp_group if a.tp > 1 else None
            teacher = load_teacher(
                a.distill_from, self.train_dtype, self.device, tp_group, compile=compiled and a.tp == 1
            )
            distill = Distillation(teacher, *self.distill, compile=compiled)
        return make_engine(
            model,
            self.ds_config,
            a.lr,
            a.weight_decay,
            self.total_steps,
            a.warmup_ratio,
            a.min_lr_ratio,
            a.loss,
            self.groups.mpu() if a.tp > 1 else None,
            distill=distill,
        )

    # --- steps ------------------------------------------------------------------------------------

    def _micro_batches(self, step: int):
        return self.micro_batches(step, self.groups.dp_rank, self.groups.dp_size, self.device)

    def _terms(self, total: torch.Tensor) -> torch.Tensor:
        """The loss sum of the last forward and its parts: [loss, ce] or [loss, ce, kl], float64."""
        terms = self.engine.module.terms
        return torch.stack([total.detach(), terms["ce"], *([terms["kl"]] if self.distill else [])]).double()

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step; returns the global mean token loss, and with a teacher its terms `ce`, `kl`."""
        batches, n_tokens = self.batches.get(step)
        scale = self.groups.dp_size * self.gas / n_tokens  # DeepSpeed averages over DP and accumulation
        sums = 0  # NCCL reduces device tensors
        for batch in batches:
            total = self.engine(batch["input_ids"], batch["labels"])
            if _fault("nan-loss", step + 1):
                total = total * float("nan")
            sums = sums + self._terms(total)
            self.engine.backward(total * scale)
            self.engine.step()
        if self.groups.dp_size > 1:
            dist.all_reduce(sums, group=self.groups.dp_group)
        means = (sums / n_tokens).tolist()
        return dict(zip(("loss", "ce", "kl") if self.distill else ("loss",), means))

    @torch.no_grad()
    def validation(self) -> dict[str, float]:
        """The mean token loss (cross-entropy) over the held-out rows, and with a teacher the mean KL
        divergence from it at temperature 1: {"valid_loss", "valid_kl"} (all ranks; rows split across
        data-parallel ranks); empty without validation rows."""
        rows = self.valid_rows
        if len(rows) == 0:
            return {}
        ds = self.valid if self.valid is not None else self.data
        self.engine.eval()
        parts = np.array_split(rows, self.groups.dp_size)  # the first part is the longest
        mine = parts[self.groups.dp_rank]
        sums, count = 0, torch.zeros((), dtype=torch.float64, device=self.device)
        # every rank runs as many forwards as the longest part (ZeRO-3 gathers weights collectively);
        # a rank out of rows repeats one and does not count it
        for i in range(0, len(parts[0]), self.micro):
            chunk, counted = (mine[i : i + self.micro], 1) if i < len(mine) else (rows[:1], 0)
            batch = collate(ds, chunk, self.device)
            total = self.engine(batch["input_ids"], batch["labels"], temperature=1.0)
            sums = sums + counted * self._terms(total)[1:]  # ce (and kl)
            count += counted * (batch["labels"][:, 1:] != -100).sum()
        self.engine.train()
        if self.groups.dp_size > 1:
            sums = torch.cat([sums, count[None]])
            dist.all_reduce(sums, group=self.groups.dp_group)
            sums, count = sums[:-1], sums[-1]
        means = (sums / count.clamp(min=1)).tolist()
        return dict(zip(("valid_loss", "valid_kl"), means))

    # --- checkpoints ------------------------------------------------------------------------------

    def _full_state_dict(self) -> dict | None:
        """The TP=1 model state dict on rank 0 (None elsewhere), in the training dtype; collective."""
        stage = self.ds_config.get("zero_optimization", {}).get("stage", 0)
        if stage == 3:
            sd = self.engine._zero3_consolidated_16bit_state_dict()
            return {k.removeprefix("model."): v for k, v in sd.items()} if self.rank == 0 else None
        model = self.engine.module.model
        if self.args.tp > 1:
            sd = tp.gather_full_state_dict(model, self.groups.tp_group)
        else:
            sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        return sd if self.rank == 0 else None

    def _master_state_dict(self) -> dict | None:
        """The TP=1 model state dict of the optimizer's float32 master weights (not the 16-bit copies
        the forward uses) on rank 0, None elsewhere; collective (each parameter gathered over the
        data-parallel ranks, then over the TP ranks)."""
        from deepspeed.utils import safe_get_full_fp32_param

        model = self.engine.module.model
        masters, by_param = {}, {}
        for name, p in model.named_parameters(remove_duplicate=False):  # tied names share one tensor
            if id(p) not in by_param:
                full = safe_get_full_fp32_param(p)  # None when the optimizer keeps no other copy (fp32 training)
                by_param[id(p)] = (p.detach() if full is None else full).float().cpu()
            masters[name] = by_param[id(p)]
        sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}  # the buffers, and every name
        sd.update(unpack_tensors(model, masters))
        if self.args.tp > 1:
            sd = tp.gather_full_tensors(sd, model.config, self.groups.tp_group)
        return sd if self.rank == 0 else None

    def save(self, step: int, valid_loss: float | None) -> None:
        tag = f"step_{step}"
        state = {
            "step": step,
            "rows_consumed": step * self.global_batch,
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if self.device.type == "cuda" else None,
            },
        }
        folder = self.ckpt_dir / tag
        if self.rank == 0 and folder.exists():  # a save that was cut short: replace it
            shutil.rmtree(folder)
        dist.barrier()
        try:  # a full disk says so in many ways (torch's zip writer, safetensors): one OSError for all
            with unpacked_checkpoint(self.engine):  # so zero_to_fp32.py writes the model's own names
                self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=state, save_latest=False)
            sd = self._master_state_dict() if self.args.export_dtype == "float32" else self._full_state_dict()
            if self.rank == 0:
                dtype = getattr(torch, self.args.export_dtype, None) or next(iter(sd.values())).dtype
                export_pretrained(
                    sd,
                    self.config,
                    self.run_dir / "hf" / tag,
                    tokenizer_from=self.args.init,
                    overwrite=True,
                    dtype=dtype,
                    hf_kwargs=special_token_ids(self.hf_config),
                )
        except Exception as e:
            raise as_disk_full(e, str(folder)) from None
        dist.barrier()
        if _fault("kill-in-save", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.rank == 0:
            files = manifest(folder, exclude=(COMPLETE,))
            atomic_write(folder / COMPLETE, json.dumps({"step": step, "valid_loss": valid_loss, "files": files}) + "\n")
            atomic_write(self.ckpt_dir / LATEST, tag)
            self._prune()
            if _fault("kill-before-eval", step):
                os.kill(os.getpid(), signal.SIGKILL)
            if self.args.eval_tasks:
                self._evaluate(step, self.run_dir / "hf" / tag)
        dist.barrier()

    def _evaluate_unevaluated(self) -> None:
        """Evaluate the checkpoint the run resumes from if a kill came between its completion and its
        evaluation (rank 0, with --eval-tasks); collective."""
        step = self.start
        if self.rank == 0 and step and self.args.eval_tasks:
            result = self.run_dir / "eval" / f"step_{step}.json"
            if not result.exists() and (self.run_dir / "hf" / f"step_{step}").is_dir():
                print(f"evaluating step_{step}, whose evaluation was cut short", flush=True)
                self._evaluate(step, self.run_dir / "hf" / f"step_{step}")
        dist.barrier()

    def _prune(self) -> None:
        """Keep the newest `--keep-last` complete checkpoints; drop incomplete ones older than them."""
        if not self.args.keep_last:
            return
        keep = checkpoint_steps(self.ckpt_dir)[-self.args.keep_last :]
        for step in checkpoint_steps(self.ckpt_dir, complete_only=False):
            if step not in keep and step < max(keep):
                shutil.rmtree(self.ckpt_dir / f"step_{step}", ignore_errors=True)

    def _evaluate(self, step: int, model_dir: Path) -> None:
        from ..evaluate import eval_scalars, try_evaluate_checkpoint

        out = self.run_dir / "eval" / f"step_{step}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        result, error = try_evaluate_checkpoint(
            str(model_dir),
            self.args.eval_tasks.split(","),
            include_path=self.args.eval_include_path,
            limit=self.args.eval_limit,
            out_path=str(out),
        )
        if error is not None:
            print(f"warning: evaluation at step {step} failed: {error}", file=sys.stderr, flush=True)
            self.metrics.log({"step": step, "eval_error": error})
            return
        self.metrics.log({"step": step, **eval_scalars(result)})

    def _choose_checkpoint(self) -> int | None:
        """The step to resume from: the newest complete checkpoint that matches its manifest (checked
        on rank 0). Newer damaged ones are moved aside, each reported in one line; with complete
        checkpoints but none intact, a CheckpointError. Collective."""
        choice = [None]
        if self.rank == 0:
            step, damaged = newest_intact_checkpoint(self.ckpt_dir)
            if step is None and damaged:
                choice = [
                    f"{self.ckpt_dir}: no intact checkpoint to resume from: "
                    + "; ".join(f"step_{s}: {problem}" for s, problem in damaged)
                    + "; restore the files, or choose a new --out"
                ]
            else:
                for s, problem in damaged:
                    aside = move_aside(self.ckpt_dir / f"step_{s}")
                    print(f"skipping checkpoint step_{s}: {problem}; moved to {aside}", file=sys.stderr, flush=True)
                if damaged:
                    atomic_write(self.ckpt_dir / LATEST, f"step_{step}")
                choice = [step]
        dist.broadcast_object_list(choice, src=0)
        if isinstance(choice[0], str):
            raise CheckpointError(choice[0])
        return choice[0]

    def _resume(self, step: int | None) -> int:
        if step is None:
            return 0
        tag = f"step_{step}"
        tp.check_resume_tp(self.ckpt_dir, self.args.tp, tag)
        with unpacked_checkpoint(self.engine):
            _, state = self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag)
        if state is None:
            raise CheckpointError(f"{self.ckpt_dir / tag}: DeepSpeed could not load this checkpoint")
        if self.rank == 0:
            print(f"resuming from {self.ckpt_dir / tag} (step {step} of {self.total_steps})", flush=True)
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"])
        return int(state["step"])

    # --- main loop --------------------------------------------------------------------------------

    def train(self) -> int:
        """The steps from `start` to the end: train, log, validate and save."""
        from tqdm import tqdm

        start = self.start
        self._evaluate_unevaluated()
        if start >= self.total_steps:
            if self.rank == 0:
                print(f"{self.run_dir}: already complete ({start} of {self.total_steps} steps)")
            return 0
        seq = self.data.seq_len
        flops_per_token = self.config.flops_per_token(seq)
        bar = tqdm(
            total=self.total_steps,
            initial=start,
            desc="uptrain",
            unit="step",
            disable=self.rank != 0,
            dynamic_ncols=True,
        )
        try:
            for step in range(start, self.total_steps):
                t0 = time.perf_counter()
                lr = self.engine.get_lr()[0]  # the rate this step uses
                terms = self.train_step(step)
                loss = terms["loss"]
                if not math.isfinite(loss):
                    good = checkpoint_steps(self.ckpt_dir)
                    where = (
                        f"the last good checkpoint is {self.ckpt_dir / f'step_{good[-1]}'}"
                        if good
                        else "no checkpoint was saved yet"
                    )
                    raise NonFiniteLoss(f"step {step + 1}: the loss is {loss}; stopped, {where}")
                sync(self.device)
                dt = time.perf_counter() - t0
                done = step + 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if done % self.args.log_interval == 0 or done == self.total_steps or done == start + 1:
                    tokens = self.global_batch * seq / dt
                    norm = self.engine.get_global_grad_norm()
                    self.metrics.log(
                        {
                            "step": done,
                            **terms,
                            "lr": lr,
                            "grad_norm": float(norm) if norm is not None else None,
                            "tokens_per_s": tokens,
                            "tokens_per_s_per_device": tokens / self.world,
                            "mfu": tokens / self.world * flops_per_token / self.args.tp / self.peak_flops,
                            "max_memory_bytes": max_memory_bytes(self.device),
                            "step_time_s": dt,
                            "rows_consumed": done * self.global_batch,
                        }
                    )
                if done % self.args.save_interval == 0 or done == self.total_steps:
                    valid = self.validation()
                    if valid:
                        self.metrics.log({"step": done, **valid}, prefix="valid")
                        if self.rank == 0:
                            kl = f", KL to the teacher {valid['valid_kl']:.4f}" if "valid_kl" in valid else ""
                            bar.write(f"step {done}: validation loss {valid['valid_loss']:.4f}{kl}")
                    self.save(done, valid.get("valid_loss"))
        finally:
            bar.close()
        if self.rank == 0:
            print(
                f"done: {self.total_steps} steps; TensorBoard: tensorboard --logdir {self.run_dir / 'tensorboard'}; "
                f"transformers export: {self.run_dir / 'hf' / f'step_{self.total_steps}'}"
            )
        return 0


def main(args: RunOptions) -> int:
    """Entry point for launch/uptrain.py (its errors become one line through `cli.entry_point`). Rank 0
    holds the run folder's lock (`RUN_DIR/.lock`) for the whole run: a second command on the same
    --out is refused while this one runs."""
    single_process_env()
    lock = contextlib.nullcontext()
    if int(os.environ["RANK"]) == 0:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        lock = OutputLock(Path(args.out) / LOCK, f"--out {args.out}")
    with lock:
        trainer = Trainer(args)
        try:
            return trainer.train()
        finally:
            trainer.close()
