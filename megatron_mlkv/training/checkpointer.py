"""`Checkpointer`: the run folder's checkpoints, for one rank.

RUN_DIR/checkpoints/step_N/      DeepSpeed checkpoints; complete once `step_N/COMPLETE` exists (it holds
                                 the manifest of the folder's files: sizes and XXH3 checksums)
RUN_DIR/checkpoints/latest       the newest complete checkpoint's tag (DeepSpeed's zero_to_fp32.py reads it)
RUN_DIR/hf/step_N/               transformers export of each checkpoint (TP=1, --export-dtype)
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys

import numpy as np
import torch
import torch.distributed as dist

from .. import parallel as tp
from ..errors import CheckpointError, as_disk_full
from ..hf import export_pretrained, remove_partial_exports, special_token_ids
from ..integrity import atomic_write, manifest
from .packing import unpack_tensors, unpacked_checkpoint
from .plan import RunPlan
from .run_dir import COMPLETE, LATEST, checkpoint_steps, move_aside, newest_intact_checkpoint


def fault(kind: str, step: int) -> bool:
    """Test hook: MLKV_FAULT='kill-in-save@N', 'kill-before-eval@N' or 'nan-loss@N' injects that fault at step N."""
    return os.environ.get("MLKV_FAULT", "") == f"{kind}@{step}"


class Checkpointer:
    """Choose the checkpoint to resume from, resume the engine and the RNG from it, save a step (the
    DeepSpeed checkpoint with the step and RNG state, the transformers export gathered to TP=1, the
    manifest that completes it) and prune old ones. Methods marked collective run on every rank;
    rank 0 writes what all ranks share."""

    def __init__(self, plan: RunPlan, groups, device: torch.device):
        self.plan, self.groups, self.device = plan, groups, device
        self.dir = plan.ckpt_dir
        self.exports = plan.run_dir / "hf"
        if plan.rank == 0:
            for partial in remove_partial_exports(self.exports):
                print(f"removed {partial}, an export a killed run left unfinished", flush=True)

    def choose(self) -> int | None:
        """The step to resume from: the newest complete checkpoint that matches its manifest (checked
        on rank 0). Newer damaged ones are moved aside, each reported in one line; with complete
        checkpoints but none intact, a CheckpointError. Collective."""
        choice = [None]
        if self.plan.rank == 0:
            step, damaged = newest_intact_checkpoint(self.dir)
            if step is None and damaged:
                choice = [
                    f"{self.dir}: no intact checkpoint to resume from: "
                    + "; ".join(f"step_{s}: {problem}" for s, problem in damaged)
                    + "; restore the files, or choose a new --out"
                ]
            else:
                for s, problem in damaged:
                    aside = move_aside(self.dir / f"step_{s}")
                    print(f"skipping checkpoint step_{s}: {problem}; moved to {aside}", file=sys.stderr, flush=True)
                if damaged:
                    atomic_write(self.dir / LATEST, f"step_{step}")
                choice = [step]
        dist.broadcast_object_list(choice, src=0)
        if isinstance(choice[0], str):
            raise CheckpointError(choice[0])
        return choice[0]

    def resume(self, engine, step: int | None) -> int:
        """Load checkpoint `step` (None: start afresh) into `engine` and restore the RNG; the step to go
        on from."""
        if step is None:
            return 0
        tag = f"step_{step}"
        tp.check_resume_tp(self.dir, self.plan.args.tp, tag)
        with unpacked_checkpoint(engine):
            _, state = engine.load_checkpoint(str(self.dir), tag=tag)
        if state is None:
            raise CheckpointError(f"{self.dir / tag}: DeepSpeed could not load this checkpoint")
        if self.plan.rank == 0:
            print(f"resuming from {self.dir / tag} (step {step} of {self.plan.total_steps})", flush=True)
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"])
        return int(state["step"])

    def save(self, engine, step: int, valid_loss: float | None) -> None:
        """Save step `step`: DeepSpeed's checkpoint, the export, then the manifest (`COMPLETE`) and
        `latest`, and prune to --keep-last. Collective."""
        plan, tag = self.plan, f"step_{step}"
        state = {
            "step": step,
            "rows_consumed": step * plan.global_batch,
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if self.device.type == "cuda" else None,
            },
        }
        folder = self.dir / tag
        if plan.rank == 0 and folder.exists():  # a save that was cut short: replace it
            shutil.rmtree(folder)
        dist.barrier()
        try:  # a full disk says so in many ways (torch's zip writer, safetensors): one OSError for all
            with unpacked_checkpoint(engine):  # so zero_to_fp32.py writes the model's own names
                engine.save_checkpoint(str(self.dir), tag=tag, client_state=state, save_latest=False)
            float32 = plan.args.export_dtype == "float32"
            sd = self._master_state_dict(engine) if float32 else self._full_state_dict(engine)
            if plan.rank == 0:
                dtype = getattr(torch, plan.args.export_dtype, None) or next(iter(sd.values())).dtype
                export_pretrained(
                    sd,
                    plan.config,
                    self.exports / tag,
                    tokenizer_from=plan.args.init,
                    overwrite=True,
                    dtype=dtype,
                    hf_kwargs=special_token_ids(plan.hf_config),
                )
        except Exception as e:
            raise as_disk_full(e, str(folder)) from None
        dist.barrier()
        if fault("kill-in-save", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if plan.rank == 0:
            files = manifest(folder, exclude=(COMPLETE,))
            atomic_write(folder / COMPLETE, json.dumps({"step": step, "valid_loss": valid_loss, "files": files}) + "\n")
            atomic_write(self.dir / LATEST, tag)
            self._prune()
        dist.barrier()

    def last_good(self) -> str:
        """Where a stopped run can go on from, in words."""
        good = checkpoint_steps(self.dir)
        return f"the last good checkpoint is {self.dir / f'step_{good[-1]}'}" if good else "no checkpoint was saved yet"

    def _prune(self) -> None:
        """Keep the newest `--keep-last` complete checkpoints; drop incomplete ones older than them."""
        keep_last = self.plan.args.keep_last
        if not keep_last:
            return
        keep = checkpoint_steps(self.dir)[-keep_last:]
        for step in checkpoint_steps(self.dir, complete_only=False):
            if step not in keep and step < max(keep):
                shutil.rmtree(self.dir / f"step_{step}", ignore_errors=True)

    def _full_state_dict(self, engine) -> dict | None:
        """The TP=1 model state dict on rank 0 (None elsewhere), in the training dtype; collective."""
        stage = self.plan.ds_config.get("zero_optimization", {}).get("stage", 0)
        if stage == 3:
            sd = engine._zero3_consolidated_16bit_state_dict()
            return {k.removeprefix("model."): v for k, v in sd.items()} if self.plan.rank == 0 else None
        model = engine.module.model
        if self.plan.args.tp > 1:
            sd = tp.gather_full_state_dict(model, self.groups.tp_group)
        else:
            sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        return sd if self.plan.rank == 0 else None

    def _master_state_dict(self, engine) -> dict | None:
        """The TP=1 model state dict of the optimizer's float32 master weights (not the 16-bit copies
        the forward uses) on rank 0, None elsewhere; collective (each parameter gathered over the
        data-parallel ranks, then over the TP ranks)."""
        from deepspeed.utils import safe_get_full_fp32_param

        model = engine.module.model
        masters, by_param = {}, {}
        for name, p in model.named_parameters(remove_duplicate=False):  # tied names share one tensor
            if id(p) not in by_param:
                full = safe_get_full_fp32_param(p)  # None when the optimizer keeps no other copy (fp32 training)
                by_param[id(p)] = (p.detach() if full is None else full).float().cpu()
            masters[name] = by_param[id(p)]
        sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}  # the buffers, and every name
        sd.update(unpack_tensors(model, masters))
        if self.plan.args.tp > 1:
            sd = tp.gather_full_tensors(sd, model.config, self.groups.tp_group)
        return sd if self.plan.rank == 0 else None
