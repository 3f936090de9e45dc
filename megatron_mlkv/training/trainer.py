"""Uptraining with DeepSpeed: the loop behind `deepspeed launch/uptrain.py`.

`RunPlan(args)` (plan.py) is what the options decide before any process group exists (DeepSpeed
config, model config, data, row order, step count); `Trainer(args)` holds it and builds what a run
needs on top (process groups, the engine resumed by its `Checkpointer` (checkpointer.py), metrics,
the data prefetcher); `Trainer.train()` only loops: train, log, validate, save, evaluate.

Run folder (the checkpoints: checkpointer.py):
    RUN_DIR/.lock                    held while a command runs on RUN_DIR (its host and pid)
    RUN_DIR/run_config.json          what must not change between a run and its resumption
    RUN_DIR/metrics.jsonl            one JSON object per logged step (and per validation)
    RUN_DIR/tensorboard/             the same scalars as TensorBoard events
    RUN_DIR/checkpoints/, hf/        checkpoints and their transformers exports
    RUN_DIR/eval/step_N.json         lm-evaluation-harness results (with --eval-tasks)

With --distill-from the loss is (1 - A)·CE + A·T²·KL(teacher || student) (`distill.py`); both terms are
logged beside it (`ce`, `kl`), validation reports the CE and the KL at temperature 1 (`valid_kl`),
and run_config.json records the teacher's weights fingerprint, so a resume with another teacher is refused.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .. import parallel as tp
from ..data import Prefetcher, collate
from ..errors import MLKVError, UptrainError
from ..integrity import OutputLock
from ..loading import load_pretrained
from .checkpointer import Checkpointer, fault
from .deepspeed_patches import no_shared_memory_allreduce
from .distill import Distillation, load_teacher
from .engine import compile_blocks, make_engine
from .float8 import left_in_bf16, to_float8
from .metrics import MetricsLog, matmul_flops_per_s, max_memory_bytes, sync
from .options import RunOptions
from .plan import RunPlan

LOCK = ".lock"


class NonFiniteLoss(MLKVError):
    """The loss became NaN or infinite; training stops and the last good checkpoint stays."""

    exit_code = 3


def single_process_env() -> None:
    """Environment for a single process started without the deepspeed launcher (rank 0 of 1, a free
    port); unchanged when a launcher set it."""
    if "RANK" not in os.environ:
        from ..cli import free_port

        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )


class Trainer:
    """One uptraining run on this rank: `Trainer(args)` builds it (its `plan`, process groups, the engine
    resumed from the newest intact checkpoint by `checkpoints`, metrics, the prefetcher), `train()` runs
    the remaining steps; `close()` (also on failure) stops the prefetcher and flushes the metrics."""

    def __init__(self, args: RunOptions):
        import deepspeed

        self.args = args
        self.plan = plan = RunPlan(args)
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        plan.check_resumable()
        self.train_dtype = (
            torch.bfloat16
            if plan.ds_config.get("bf16", {}).get("enabled")
            else torch.float16
            if plan.ds_config.get("fp16", {}).get("enabled")
            else torch.float32
        )
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
        self.checkpoints = Checkpointer(plan, self.groups, self.device)
        resume_from = self.checkpoints.choose()
        self.engine = self._build_engine()
        self.start = self.checkpoints.resume(self.engine, resume_from)
        self.metrics = MetricsLog(plan.run_dir, self.start, enabled=plan.rank == 0)
        self.peak_flops = matmul_flops_per_s(
            self.device, torch.float32 if self.device.type == "cpu" else self.train_dtype
        )
        # the next step's batches are collated while this one runs
        self.batches = Prefetcher(self._micro_batches, plan.total_steps)

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
        a = self.args
        if a.fp8:  # before the layers are compiled and DeepSpeed takes the parameters
            note = left_in_bf16(model)
            if note and self.plan.rank == 0:
                print(f"note: {note}", flush=True)
            to_float8(model, a.fp8, emulate=self.plan.fp8_emulate)
        compiling = a.compile and self.device.type == "cuda"
        # Layers are compiled only without --tp: compiled around the TP region's autograd collectives
        # they give wrong gradients (the losses leave TP=1's after the first step); eager TP matches TP=1.
        compile_layers = compiling and a.tp == 1
        if compile_layers:
            compile_blocks(model)
        distill = None
        if self.plan.distill:
            teacher = load_teacher(
                a.distill_from, self.train_dtype, self.device, self.groups.tp_group if a.tp > 1 else None
            )
            if compile_layers:
                compile_blocks(teacher)
            distill = Distillation(teacher, *self.plan.distill, compile=compiling)
        return make_engine(
            model,
            self.plan.ds_config,
            a.lr,
            a.weight_decay,
            self.plan.total_steps,
            a.warmup_ratio,
            a.min_lr_ratio,
            a.loss,
            self.groups.mpu() if a.tp > 1 else None,
            distill=distill,
        )

    # --- steps ------------------------------------------------------------------------------------

    def _micro_batches(self, step: int):
        return self.plan.micro_batches(step, self.groups.dp_rank, self.groups.dp_size, self.device)

    def _terms(self, total: torch.Tensor) -> torch.Tensor:
        """The loss sum of the last forward and its parts: [loss, ce] or [loss, ce, kl], float64."""
        terms = self.engine.module.terms
        return torch.stack([total.detach(), terms["ce"], *([terms["kl"]] if self.plan.distill else [])]).double()

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step; returns the global mean token loss, and with a teacher its terms `ce`, `kl`."""
        batches, n_tokens = self.batches.get(step)
        scale = self.groups.dp_size * self.plan.gas / n_tokens  # DeepSpeed averages over DP and accumulation
        sums = 0  # NCCL reduces device tensors
        for batch in batches:
            total = self.engine(batch["input_ids"], batch["labels"])
            if fault("nan-loss", step + 1):
                total = total * float("nan")
            sums = sums + self._terms(total)
            self.engine.backward(total * scale)
            self.engine.step()
        if self.groups.dp_size > 1:
            dist.all_reduce(sums, group=self.groups.dp_group)
        means = (sums / n_tokens).tolist()
        return dict(zip(("loss", "ce", "kl") if self.plan.distill else ("loss",), means))

    @torch.no_grad()
    def validation(self) -> dict[str, float]:
        """The mean token loss (cross-entropy) over the held-out rows, and with a teacher the mean KL
        divergence from it at temperature 1: {"valid_loss", "valid_kl"} (all ranks; rows split across
        data-parallel ranks); empty without validation rows."""
        plan, micro = self.plan, self.plan.micro
        rows = plan.valid_rows
        if len(rows) == 0:
            return {}
        ds = plan.valid if plan.valid is not None else plan.data
        self.engine.eval()
        parts = np.array_split(rows, self.groups.dp_size)  # the first part is the longest
        mine = parts[self.groups.dp_rank]
        sums, count = 0, torch.zeros((), dtype=torch.float64, device=self.device)
        # every rank runs as many forwards as the longest part (ZeRO-3 gathers weights collectively);
        # a rank out of rows repeats one and does not count it
        for i in range(0, len(parts[0]), micro):
            chunk, counted = (mine[i : i + micro], 1) if i < len(mine) else (rows[:1], 0)
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

    # --- checkpoints and their evaluation ---------------------------------------------------------

    def save(self, step: int, valid_loss: float | None) -> None:
        """Save step `step` (`Checkpointer.save`), then evaluate its export with --eval-tasks. Collective."""
        self.checkpoints.save(self.engine, step, valid_loss)
        if self.plan.rank == 0:
            if fault("kill-before-eval", step):
                os.kill(os.getpid(), signal.SIGKILL)
            if self.args.eval_tasks:
                self._evaluate(step)
        dist.barrier()

    def _evaluate_unevaluated(self) -> None:
        """Evaluate the checkpoint the run resumes from if a kill came between its completion and its
        evaluation (rank 0, with --eval-tasks); collective."""
        step = self.start
        if self.plan.rank == 0 and step and self.args.eval_tasks:
            result = self.plan.run_dir / "eval" / f"step_{step}.json"
            if not result.exists() and (self.checkpoints.exports / f"step_{step}").is_dir():
                print(f"evaluating step_{step}, whose evaluation was cut short", flush=True)
                self._evaluate(step)
        dist.barrier()

    def _evaluate(self, step: int) -> None:
        from ..evaluation.harness import eval_scalars, try_evaluate_checkpoint

        out = self.plan.run_dir / "eval" / f"step_{step}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        result, error = try_evaluate_checkpoint(
            str(self.checkpoints.exports / f"step_{step}"),
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

    # --- main loop --------------------------------------------------------------------------------

    def train(self) -> int:
        """The steps from `start` to the end: train, log, validate and save."""
        from tqdm import tqdm

        plan, start = self.plan, self.start
        self._evaluate_unevaluated()
        if start >= plan.total_steps:
            if plan.rank == 0:
                print(f"{plan.run_dir}: already complete ({start} of {plan.total_steps} steps)")
            return 0
        seq = plan.data.seq_len
        flops_per_token = plan.config.flops_per_token(seq)
        bar = tqdm(
            total=plan.total_steps,
            initial=start,
            desc="uptrain",
            unit="step",
            disable=plan.rank != 0,
            dynamic_ncols=True,
        )
        try:
            for step in range(start, plan.total_steps):
                t0 = time.perf_counter()
                lr = self.engine.get_lr()[0]  # the rate this step uses
                terms = self.train_step(step)
                loss = terms["loss"]
                if not math.isfinite(loss):
                    raise NonFiniteLoss(f"step {step + 1}: the loss is {loss}; stopped, {self.checkpoints.last_good()}")
                sync(self.device)
                dt = time.perf_counter() - t0
                done = step + 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if done % self.args.log_interval == 0 or done == plan.total_steps or done == start + 1:
                    tokens = plan.global_batch * seq / dt
                    norm = self.engine.get_global_grad_norm()
                    self.metrics.log(
                        {
                            "step": done,
                            **terms,
                            "lr": lr,
                            "grad_norm": float(norm) if norm is not None else None,
                            "tokens_per_s": tokens,
                            "tokens_per_s_per_device": tokens / plan.world,
                            "mfu": tokens / plan.world * flops_per_token / self.args.tp / self.peak_flops,
                            "max_memory_bytes": max_memory_bytes(self.device),
                            "step_time_s": dt,
                            "rows_consumed": done * plan.global_batch,
                        }
                    )
                if done % self.args.save_interval == 0 or done == plan.total_steps:
                    valid = self.validation()
                    if valid:
                        self.metrics.log({"step": done, **valid}, prefix="valid")
                        if plan.rank == 0:
                            kl = f", KL to the teacher {valid['valid_kl']:.4f}" if "valid_kl" in valid else ""
                            bar.write(f"step {done}: validation loss {valid['valid_loss']:.4f}{kl}")
                    self.save(done, valid.get("valid_loss"))
        finally:
            bar.close()
        if plan.rank == 0:
            print(
                f"done: {plan.total_steps} steps; TensorBoard: tensorboard --logdir {plan.run_dir / 'tensorboard'}; "
                f"transformers export: {self.checkpoints.exports / f'step_{plan.total_steps}'}"
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
