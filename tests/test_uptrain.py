"""Uptraining through the real `deepspeed` launcher on the CPU (two gloo ranks).

The oracle for resume is an uninterrupted run of the same command; for ZeRO stages, the ZeRO-2 run.
Configs are the shipped ones with bf16 off (float32 makes the stage comparison tight) and a
CPU-sized micro-batch.
"""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from helpers import overwrite_bytes

from launch import uptrain as UPTRAIN
from megatron_mlkv.cli import free_port
from megatron_mlkv.conversion import convert_checkpoint
from megatron_mlkv.data import pack
from megatron_mlkv.data.synthetic import write_corpus
from megatron_mlkv.data.tokenizer import train_tokenizer
from megatron_mlkv.errors import UptrainError
from megatron_mlkv.training import lr_factor
from megatron_mlkv.training.options import RunOptions

# `make test-compat` (the version bounds) runs the tests marked compat: each DeepSpeed, torch and lm-eval
# API this file reaches (launcher, engine, ZeRO 1-3 and offload, checkpoints and zero_to_fp32, TP through
# the mpu, the rendezvous, lm-eval's tasks) at least once. The faults and refusals built on top of them
# test this package's own logic and run in `make test` only.
compat = pytest.mark.compat

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8


def ds_config(tmp: Path, stage_file: str, micro: int = 4, **changes) -> Path:
    cfg = json.loads((ROOT / "ds_configs" / stage_file).read_text())
    cfg["train_micro_batch_size_per_gpu"] = micro
    cfg["bf16"] = {"enabled": False}
    cfg.update(changes)
    path = tmp / f"{stage_file.removesuffix('.json')}_{micro}_{len(changes)}.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tokenizer, packed train/valid data, a tiny GPT-NeoX base and its MLKV conversion."""
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    tmp = tmp_path_factory.mktemp("uptrain")
    corpus = write_corpus(tmp / "train.jsonl", 300, seed=0)
    valid = write_corpus(tmp / "valid.jsonl", 30, seed=1)
    tok_dir = train_tokenizer(corpus, tmp / "tok", vocab_size=300)
    pack([str(corpus)], str(tok_dir), 64, str(tmp / "train"), progress=False)
    pack([str(valid)], str(tok_dir), 64, str(tmp / "valid"), progress=False)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    base = GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            eos_token_id=tok.eos_token_id,
        )
    )
    base.save_pretrained(tmp / "base")
    tok.save_pretrained(tmp / "base")
    convert_checkpoint(str(tmp / "base"), tmp / "mlkv", kv_layers=2, kv_groups=1, progress=False)
    return tmp


def uptrain(workdir: Path, out: Path, config: Path, *extra, ranks: int = 2, env=None, wait=True, init=None, port=None):
    cmd = [
        "deepspeed",
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(port or free_port()),
        str(ROOT / "launch" / "uptrain.py"),
        "--ds_config",
        str(config),
        "--init",
        str(init or workdir / "mlkv"),
        "--data",
        str(workdir / "train"),
        "--valid-data",
        str(workdir / "valid"),
        "--out",
        str(out),
        "--train-iters",
        str(STEPS),
        "--lr",
        "3e-3",
        *map(str, extra),
    ]
    full_env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **(env or {}))
    if not wait:
        return subprocess.Popen(
            cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=600)


def losses(run: Path) -> dict[int, float]:
    records = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def ok(result) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def zero2_port():
    return free_port()


@pytest.fixture(scope="module")
def zero2_run(workdir, zero2_port):
    """The uninterrupted reference run: ZeRO-2, 2 ranks, checkpoints every 4 steps."""
    run = workdir / "runs" / "zero2"
    ok(uptrain(workdir, run, ds_config(workdir, "zero2.json"), "--save-interval", 4, port=zero2_port))
    return run


@compat
@pytest.mark.slow
def test_a_run_leaves_no_shared_memory_behind(zero2_run, zero2_port):
    """DeepSpeed's CPU all-reduce op would map /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>
    per rank and never unlink it (67 MB each): the op is never built."""
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{zero2_port}_*"))


@compat
@pytest.mark.slow
def test_two_rank_zero2_loss_falls_and_everything_is_written(zero2_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM

    got = losses(zero2_run)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert sum(got[s] for s in (7, 8)) < sum(got[s] for s in (1, 2)) - 0.2
    records = [json.loads(line) for line in (zero2_run / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if "loss" in r)
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "max_memory_bytes"):
        assert key in first and first[key] is not None, key
    lrs = [r["lr"] for r in records if "lr" in r]
    # warm-up over int(0.2 * 8) = 1 step, then cosine decay from 3e-3 to 3e-4
    assert lrs == pytest.approx([3e-3 * lr_factor(s, STEPS, 0.2, 0.1) for s in range(STEPS)])
    assert lrs[0] == pytest.approx(3e-3) and lrs[2] < lrs[1] and lrs[-1] > 3e-4
    valid = [r["valid_loss"] for r in records if "valid_loss" in r]
    assert len(valid) == 2 and valid[1] < valid[0]
    # TensorBoard events hold the same scalars
    acc = EventAccumulator(str(zero2_run / "tensorboard"))
    acc.Reload()
    tb = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert tb.keys() == got.keys()
    assert all(abs(tb[s] - got[s]) < 1e-5 * abs(got[s]) for s in got)
    assert [e.step for e in acc.Scalars("valid/valid_loss")] == [4, 8]
    # complete checkpoints and transformers exports at 4 and 8
    for step in (4, 8):
        assert (zero2_run / "checkpoints" / f"step_{step}" / "COMPLETE").is_file()
        model = AutoModelForCausalLM.from_pretrained(zero2_run / "hf" / f"step_{step}", trust_remote_code=True)
        assert model.config.num_kv_heads == 1 and model.config.kv_owner == [0, 0, 2, 2]


@pytest.mark.slow
def test_rerunning_a_finished_run_does_nothing(workdir, zero2_run):
    before = (zero2_run / "metrics.jsonl").read_text()
    partial = zero2_run / "hf" / ".step_8.tmp-k1lled"  # what an export killed midway leaves
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    result = uptrain(workdir, zero2_run, ds_config(workdir, "zero2.json"), "--save-interval", 4)
    ok(result)
    assert "already complete" in result.stdout
    assert (zero2_run / "metrics.jsonl").read_text() == before
    assert f"removed {partial}" in result.stdout and not partial.exists()
    assert sorted(p.name for p in (zero2_run / "hf").iterdir()) == ["step_4", "step_8"]


@compat
@pytest.mark.slow
def test_killed_during_a_save_resumes_with_identical_losses(workdir, zero2_run):
    run = workdir / "runs" / "kill_in_save"
    config = ds_config(workdir, "zero2.json")
    killed = uptrain(workdir, run, config, "--save-interval", 2, "--keep-last", 1, env={"MLKV_FAULT": "kill-in-save@6"})
    assert killed.returncode != 0
    assert (run / "checkpoints" / "step_6").is_dir() and not (run / "checkpoints" / "step_6" / "COMPLETE").exists()
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_4", "step_6"]  # --keep-last 1
    assert max(losses(run)) == 6
    resumed = uptrain(workdir, run, config, "--save-interval", 2, "--keep-last", 1)
    ok(resumed)
    assert f"resuming from {run / 'checkpoints' / 'step_4'} (step 4 of {STEPS})" in resumed.stdout
    assert losses(run) == losses(zero2_run)  # exactly: same rows, lr, optimizer state, RNG
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_8"]


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(workdir, zero2_run):

    run = workdir / "runs" / "damaged"
    shutil.copytree(zero2_run, run)
    ckpt, config = run / "checkpoints", ds_config(workdir, "zero2.json")
    shard = sorted((ckpt / "step_8").glob("*optim_states.pt"))[-1]
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:-100])  # a file cut short
    result = uptrain(workdir, run, config, "--save-interval", 4)
    ok(result)
    skipped = [line for line in result.stderr.splitlines() if "skipping checkpoint" in line]
    assert skipped == [
        f"skipping checkpoint step_8: {shard.name} is {size - 100} bytes, {size} when saved; "
        f"moved to {ckpt / 'step_8.damaged'}"
    ]
    assert losses(run) == losses(zero2_run)  # steps 5-8 again from step_4: exactly the same
    assert (ckpt / "step_8.damaged" / shard.name).stat().st_size == size - 100  # kept for inspection
    assert (ckpt / "step_8" / "COMPLETE").is_file() and (ckpt / "latest").read_text() == "step_8"
    # the same size, other bytes, in every checkpoint: nothing to fall back to, one line, nothing moved
    for step in (4, 8):
        overwrite_bytes(ckpt / f"step_{step}" / "mp_rank_00_model_states.pt", 1000, b"\xff" * 16)
    result = uptrain(workdir, run, config, "--save-interval", 4)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert (
        f"error: {ckpt}: no intact checkpoint to resume from: step_8: mp_rank_00_model_states.pt does not "
        f"match its checksum"
    ) in result.stderr
    assert "; step_4: mp_rank_00_model_states.pt does not match" in result.stderr
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_4", "step_8", "step_8.damaged"]


@compat
@pytest.mark.slow
def test_zero_to_fp32_reads_our_checkpoints_and_the_float32_export_is_the_master_weights(workdir):
    """bf16 mixed precision. DeepSpeed's own zero_to_fp32.py, run as its users do (no tag: it reads
    `latest`), writes the model's own parameter names, which from_pretrained loads with nothing
    missing; they are the --export-dtype float32 export, and the bf16 weights are their rounding."""

    from transformers import AutoModelForCausalLM

    run = workdir / "runs" / "bf16"
    config = ds_config(workdir, "zero2.json", bf16={"enabled": True, "check_grad_overflow": False})
    ok(uptrain(workdir, run, config, "--train-iters", 4, "--save-interval", 2, "--export-dtype", "float32"))
    ckpt, out = run / "checkpoints", run / "fp32"
    assert (ckpt / "latest").read_text() == "step_4"
    script = subprocess.run(
        [sys.executable, str(ckpt / "zero_to_fp32.py"), str(ckpt), str(out), "--safe_serialization"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert script.returncode == 0, script.stderr[-3000:]
    for f in (run / "hf" / "step_4").iterdir():  # the weights need the export's config and modeling code
        if f.suffix in (".json", ".py") and not f.name.startswith("model.safetensors"):
            shutil.copy(f, out / f.name)
    model, info = AutoModelForCausalLM.from_pretrained(
        out, trust_remote_code=True, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    export = load_file_dir(run / "hf" / "step_4")
    got = model.state_dict()
    assert export.keys() <= got.keys() and all(v.dtype == torch.float32 for v in export.values())
    for key, value in export.items():
        assert torch.equal(got[key], value), key
    bf16 = torch.load(ckpt / "step_4" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert {v.dtype for v in bf16.values() if v.is_floating_point()} == {torch.bfloat16}
    for key, value in export.items():
        assert torch.equal(bf16[key], value.to(torch.bfloat16)), key
    assert any((v != v.to(torch.bfloat16).float()).any() for v in export.values())  # more than bf16 holds


@compat
@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, loss",
    [("zero1.json", "auto"), ("zero3.json", "auto"), ("zero3.json", "chunked"), ("zero2_offload.json", "auto")],
)
def test_zero_stages_give_the_same_losses(workdir, zero2_run, stage, loss):
    """Every stage against ZeRO-2. ZeRO-3 with the chunked loss (the CPU stand-in for the fused one)
    reads the output layer's weight outside its forward: gathered as an external parameter."""
    run = workdir / "runs" / f"{stage.removesuffix('.json')}_{loss}"
    changes = {}
    if stage == "zero3.json":  # partition every weight of the tiny model, the output layer's too
        zero = json.loads((ROOT / "ds_configs" / stage).read_text())["zero_optimization"]
        changes["zero_optimization"] = {**zero, "stage3_param_persistence_threshold": 0}
    args = ("--save-interval", 8, "--export-dtype", "float32", "--loss", loss)
    ok(uptrain(workdir, run, ds_config(workdir, stage, **changes), *args))
    got, ref = losses(run), losses(zero2_run)
    assert got.keys() == ref.keys()
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5), step
    assert_same_weights(run / "hf" / f"step_{STEPS}", zero2_run / "hf" / f"step_{STEPS}")  # the optimizer's fp32 copy


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(workdir):
    run = workdir / "runs" / "nan"
    result = uptrain(
        workdir, run, ds_config(workdir, "zero2.json"), "--save-interval", 2, env={"MLKV_FAULT": "nan-loss@3"}
    )
    assert result.returncode != 0
    assert "step 3: the loss is nan" in result.stderr
    assert "step_2" in result.stderr
    assert (run / "checkpoints" / "step_2" / "COMPLETE").is_file()
    assert not (run / "checkpoints" / "step_4").exists()


def grad_norms(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["grad_norm"] for r in records if "grad_norm" in r}


def assert_same_run(got: Path, ref: Path) -> None:
    a, b = losses(got), losses(ref)
    assert a.keys() == b.keys()
    for step in b:
        assert a[step] == pytest.approx(b[step], rel=1e-5), step
    na, nb = grad_norms(got), grad_norms(ref)
    for step in nb:  # the clipped global norm: sharded grads summed, replicated ones counted once
        assert na[step] == pytest.approx(nb[step], rel=1e-4), step


@compat
@pytest.mark.slow
def test_tp2_with_replicated_kv_heads_matches_tp1(workdir, zero2_run):
    """MLKV m=2, g=1 < T=2: each KV head replicated on both ranks, non-owner layers reuse the local
    shard. TP=2 x DP=1 with micro-batch 8 sees the same global batches as TP=1 x DP=2 with 4."""
    run = workdir / "runs" / "tp2_mlkv"
    ok(uptrain(workdir, run, ds_config(workdir, "zero2.json", micro=8), "--tp", 2, "--save-interval", 8))
    assert_same_run(run, zero2_run)
    # the export merges the TP shards, the replicated K/V head once, into the TP=1 layout and values
    assert_same_weights(run / "hf" / f"step_{STEPS}", zero2_run / "hf" / f"step_{STEPS}")


@pytest.mark.slow
def test_tp2_times_dp2_with_zero2_matches(workdir, zero2_run):
    run = workdir / "runs" / "tp2_dp2"
    ok(
        uptrain(
            workdir,
            run,
            ds_config(workdir, "zero2.json"),
            "--tp",
            2,
            "--save-interval",
            4,
            "--export-dtype",
            "float32",
            ranks=4,
        )
    )
    assert_same_run(run, zero2_run)
    assert_same_weights(run / "hf" / f"step_{STEPS}", zero2_run / "hf" / f"step_{STEPS}")  # gathered over DP and TP
    # resume keeps T: another --tp is refused before any process group, naming the saved value
    args = ("--tp", 1, "--valid-data", workdir / "valid", "--train-iters", STEPS, "--lr", "3e-3")
    result = run_single(workdir, run.parent, *args, out=run)
    assert_one_line_error(result, f"--out {run} holds a run with tp = 2, this command gives 1")


def assert_same_weights(got: Path, ref: Path) -> None:
    a, b = load_file_dir(got), load_file_dir(ref)
    assert a.keys() == b.keys()
    for key in b:
        assert a[key].dtype == b[key].dtype == torch.float32, key
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-4, msg=key)  # lr 3e-3: a wrong tensor is far off


def load_file_dir(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# --------------------------------------------------------------------------------------------------
# distillation from the base (--distill-from): logged terms, exact resume, TP=2
# --------------------------------------------------------------------------------------------------


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def teacher(workdir):
    """A GPT-NeoX of the base's shape and tokenizer whose weights (std 0.2, not the base's 0.02) make
    sharp predictions, far from the student's: a teacher the KL term must pull the student towards."""
    from transformers import GPTNeoXForCausalLM

    from megatron_mlkv.hf import copy_tokenizer_files

    torch.manual_seed(1)
    model = GPTNeoXForCausalLM.from_pretrained(workdir / "base")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(workdir / "teacher")
    copy_tokenizer_files(workdir / "base", workdir / "teacher")
    return workdir / "teacher"


@pytest.fixture(scope="module")
def distill_run(workdir, teacher):
    """The uninterrupted distilled run: ZeRO-2, 2 ranks, default A and T."""
    run = workdir / "runs" / "distill"
    ok(uptrain(workdir, run, ds_config(workdir, "zero2.json"), "--save-interval", 4, "--distill-from", teacher))
    return run


def validation_ce_and_kl(student: Path, teacher: Path, prefix: Path) -> tuple[float, float]:
    """Mean token CE of `student` and KL(teacher || student) on every row of a pack, with transformers'
    own classes (float32)."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, GPTNeoXForCausalLM

    from megatron_mlkv.data import PackedDataset

    s = AutoModelForCausalLM.from_pretrained(student, trust_remote_code=True, dtype=torch.float32).eval()
    t = GPTNeoXForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    ds = PackedDataset(str(prefix))
    ids = torch.stack([torch.as_tensor(ds[i].astype("int64")) for i in range(len(ds))])
    labels = torch.stack([torch.as_tensor(ds.loss_mask(i)) for i in range(len(ds))])[:, 1:].bool()
    with torch.no_grad():
        ls, lt = s(ids).logits[:, :-1], t(ids).logits[:, :-1]
    ce = F.cross_entropy(ls[labels], ids[:, 1:][labels])
    kl = F.kl_div(F.log_softmax(ls[labels], -1), F.log_softmax(lt[labels], -1), log_target=True, reduction="sum")
    return ce.item(), kl.item() / labels.sum().item()


@compat
@pytest.mark.slow
def test_distilled_run_logs_both_terms_and_records_its_teacher(workdir, teacher, distill_run, zero2_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_mlkv.training.distill import weights_fingerprint
    from megatron_mlkv.training.options import DISTILL_TEMPERATURE, DISTILL_WEIGHT

    train = [r for r in records(distill_run) if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    a, t = DISTILL_WEIGHT, DISTILL_TEMPERATURE
    for r in train:  # the loss is its terms' mix
        assert r["loss"] == pytest.approx((1 - a) * r["ce"] + a * t * t * r["kl"], rel=1e-6)
    plain = losses(zero2_run)
    assert train[0]["ce"] == pytest.approx(plain[1], rel=1e-6)  # same weights and rows at step 1
    valid = {r["step"]: r for r in records(distill_run) if "valid_loss" in r}
    assert sorted(valid) == [4, 8]
    for step, r in valid.items():  # CE and KL(teacher || export) at temperature 1, computed here
        ce, kl = validation_ce_and_kl(distill_run / "hf" / f"step_{step}", teacher, workdir / "valid")
        assert r["valid_loss"] == pytest.approx(ce, rel=1e-5) and r["valid_kl"] == pytest.approx(kl, rel=1e-4)
    acc = EventAccumulator(str(distill_run / "tensorboard"))
    acc.Reload()
    for tag in ("train/loss", "train/ce", "train/kl"):
        assert [e.step for e in acc.Scalars(tag)] == list(range(1, STEPS + 1)), tag
    assert [e.step for e in acc.Scalars("valid/valid_kl")] == [4, 8]
    saved = json.loads((distill_run / "run_config.json").read_text())
    assert saved["teacher_fingerprint"] == weights_fingerprint(teacher)
    assert (saved["distill_weight"], saved["distill_temperature"]) == (a, t)
    assert saved["distill_from"] == str(teacher.resolve())
    assert not any("teacher" in k for k in load_file_dir(distill_run / "hf" / f"step_{STEPS}"))


@pytest.mark.slow
def test_sigkill_at_any_moment_resumes_with_identical_losses(workdir, teacher, distill_run):
    """A distilled run (a plain one resumes the same way, less the teacher) killed by SIGKILL wherever
    it is, then rerun: the same losses and terms as the uninterrupted run."""
    run = workdir / "runs" / "distill_sigkill"
    config, args = ds_config(workdir, "zero2.json"), ("--save-interval", 3, "--distill-from", teacher)
    proc = uptrain(workdir, run, config, *args, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and max(losses(run), default=0) >= 5:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 5 <= max(losses(run)) < STEPS
    ok(uptrain(workdir, run, config, *args))
    assert [(r["step"], r["loss"], r["ce"], r["kl"]) for r in records(run) if "loss" in r] == [
        (r["step"], r["loss"], r["ce"], r["kl"]) for r in records(distill_run) if "loss" in r
    ]


@pytest.mark.slow
def test_tp2_distillation_matches_tp1(workdir, teacher, distill_run):
    """Student (one K/V head, replicated) and teacher sharded by one plan, the KL vocabulary-parallel:
    TP=2 x DP=1 with micro-batch 8 against TP=1 x DP=2 with 4."""
    run = workdir / "runs" / "distill_tp2"
    config = ds_config(workdir, "zero2.json", micro=8)
    ok(uptrain(workdir, run, config, "--tp", 2, "--save-interval", 8, "--distill-from", teacher))
    assert_same_run(run, distill_run)
    got, want = ([r for r in records(x) if "loss" in r] for x in (run, distill_run))
    for g, w in zip(got, want):
        assert g["kl"] == pytest.approx(w["kl"], rel=1e-5) and g["ce"] == pytest.approx(w["ce"], rel=1e-5)


# --------------------------------------------------------------------------------------------------
# bad input: one line, exit code 2, before the first step (single process, no launcher needed)
# --------------------------------------------------------------------------------------------------


def run_single(workdir, tmp_path, *args, env=None, init=None, data=None, config=None, in_process=True, out=None):
    """launch/uptrain.py in one process, no launcher: bad input is refused before distributed set-up.
    In-process by default (an interpreter start per case would cost seconds); in_process=False runs
    the real command line."""
    argv = [
        "--ds_config",
        str(config or ds_config(workdir, "zero2.json")),
        "--init",
        str(init or workdir / "mlkv"),
        "--data",
        str(data or workdir / "train"),
        "--out",
        str(out or tmp_path / "run"),
        *map(str, args),
    ]
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if not in_process:
        return subprocess.run(
            [sys.executable, str(ROOT / "launch" / "uptrain.py"), *argv],
            env={**clean, **(env or {})},
            capture_output=True,
            text=True,
            timeout=300,
        )
    saved, err = dict(os.environ), io.StringIO()
    os.environ.clear()
    os.environ.update({**clean, **(env or {})})
    try:
        with contextlib.redirect_stderr(err):
            try:
                code = UPTRAIN.main(argv)
            except SystemExit as e:
                code = e.code
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return types.SimpleNamespace(returncode=code, stderr=err.getvalue())


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    "changes,fragments",
    [
        ({"train_batch_size": 7}, ["train_batch_size 7", "micro"]),
        ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, ["bf16 and fp16"]),
        ({"optimizer": {"type": "Adam"}}, ["optimizer"]),
        ({"train_micro_batch_size_per_gpu": 0}, ["train_micro_batch_size_per_gpu"]),
    ],
)
def test_contradictory_ds_config_is_rejected(workdir, tmp_path, changes, fragments):
    cfg = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    cfg.update(changes)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cfg))
    assert_one_line_error(run_single(workdir, tmp_path, config=path), str(path), *fragments)


@compat
def test_unreadable_ds_config_and_zero3_with_tp(workdir, tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"train_micro_batch_size_per_gpu": 4,\n oops}')
    assert_one_line_error(run_single(workdir, tmp_path, config=bad, in_process=False), "invalid JSON at line 2")
    assert_one_line_error(run_single(workdir, tmp_path, config=tmp_path / "missing.json"), "no such file")
    two_ranks = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    assert_one_line_error(
        run_single(workdir, tmp_path, "--tp", 2, config=ds_config(workdir, "zero3.json"), env=two_ranks),
        "ZeRO stage 3",
        "--tp 2",
    )
    assert_one_line_error(run_single(workdir, tmp_path, "--tp", 3), "--tp 3 must divide")


def test_data_that_does_not_fit_the_model_is_rejected(workdir, tmp_path):
    long_rows = tmp_path / "long"
    pack([str(workdir / "valid.jsonl")], str(workdir / "tok"), 128, str(long_rows), progress=False)
    assert_one_line_error(
        run_single(workdir, tmp_path, data=long_rows), "--data", "128 tokens", "max_position_embeddings 64"
    )
    small_vocab = tmp_path / "small_vocab"
    convert_checkpoint(str(workdir / "base"), small_vocab, 2, 1, progress=False)
    cfg = json.loads((small_vocab / "config.json").read_text())
    cfg["vocab_size"] = 50  # the tokenizer's ids go up to ~300
    (small_vocab / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(run_single(workdir, tmp_path, init=small_vocab), "beyond the model's vocabulary of 50")
    assert_one_line_error(run_single(workdir, tmp_path, data=tmp_path / "nothing"), "--data")
    assert_one_line_error(run_single(workdir, tmp_path, init=tmp_path), "--init", "no config.json")
    assert_one_line_error(run_single(workdir, tmp_path, "--valid-rows", 10**6), "--valid-rows")
    for flag in ("--train-iters", "--train-tokens"):  # not "N rows make no global batch": the cause
        assert_one_line_error(run_single(workdir, tmp_path, flag, 0), f"{flag} 0 must be at least 1")


def test_data_changed_after_packing_is_refused_before_the_first_step(workdir, tmp_path):
    data = tmp_path / "data"
    for ext in ("bin", "idx", "json"):
        Path(f"{data}.{ext}").write_bytes(Path(f"{workdir / 'train'}.{ext}").read_bytes())
    overwrite_bytes(f"{data}.bin", 1000, b"\xff" * 10)  # header and index intact
    assert_one_line_error(
        run_single(workdir, tmp_path, data=data), f"--data {data}: {data}.bin", "does not match the fingerprint"
    )


def test_a_batch_damaged_after_start_up_stops_the_run_with_one_line(workdir, tmp_path):
    """The host checks each global batch's ids before they reach the model (on a GPU an id beyond the
    embedding is a device-side assert): here the file is damaged after the start-up verification."""
    from megatron_mlkv.errors import UptrainError
    from megatron_mlkv.training import RunPlan

    data = tmp_path / "data"
    pack([str(workdir / "train.jsonl")], str(workdir / "tok"), 64, str(data), progress=False)
    argv = [
        "--ds_config",
        str(ds_config(workdir, "zero2.json", micro=8)),
        "--init",
        str(workdir / "mlkv"),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "run"),
    ]
    plan = RunPlan(RunOptions.from_argv(argv))
    cpu = torch.device("cpu")
    plan.micro_batches(2, 0, 1, cpu)
    row = int(plan.sampler.batch(2)[3])
    overwrite_bytes(f"{data}.bin", row * 64 * 2 + 10, b"\xff\xff")
    plan.micro_batches(1, 0, 1, cpu)  # other rows: fine
    with pytest.raises(
        UptrainError,
        match=f"^--data: step 3: {data}.bin: row {row} holds token id 65535, beyond the model's vocabulary of",
    ):
        plan.micro_batches(2, 0, 1, cpu)


def test_resuming_on_repacked_data_is_refused(workdir, tmp_path):
    """A run started on PREFIX, then PREFIX re-packed from other documents: the rerun is refused."""
    data = tmp_path / "data"
    pack([str(workdir / "train.jsonl")], str(workdir / "tok"), 64, str(data), progress=False)
    argv = [
        "--ds_config",
        str(ds_config(workdir, "zero2.json")),
        "--init",
        str(workdir / "mlkv"),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "run"),
        "--train-iters",
        "8",
    ]
    from megatron_mlkv.training import RunPlan

    RunPlan(RunOptions.from_argv(argv)).check_resumable()  # what the first start records
    pack([str(workdir / "valid.jsonl")], str(workdir / "tok"), 64, str(data), progress=False, overwrite=True)
    assert_one_line_error(
        run_single(workdir, tmp_path, "--train-iters", 8, data=data),
        f"--out {tmp_path / 'run'} holds a run on other data: the files of --data {data} changed",
    )


def test_invalid_tp_for_the_layout_or_the_world_is_rejected(workdir, tmp_path):
    """h = 4, g = 2: T = 3 divides the world of 3 ranks but not the heads (a layout refusal that lists
    the valid T); T = 2 suits the heads but not 3 ranks (a world refusal)."""
    gqa = tmp_path / "gqa"
    convert_checkpoint(str(workdir / "base"), gqa, 4, 2, progress=False)
    env = {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0"}
    layout = run_single(workdir, tmp_path, "--tp", 3, init=gqa, env=env)
    assert layout.stderr.strip() == (
        "error: --tp 3: tensor parallelism T = 3 is invalid for h = 4, g = 2: h = 4 query heads are not "
        "divisible by T = 3; valid T for (h = 4, g = 2): 1, 2, 4"
    )
    world = run_single(workdir, tmp_path, "--tp", 2, init=gqa, env=env)
    assert world.stderr.strip() == "error: --tp 2 must divide the number of ranks 3"
    assert layout.returncode == world.returncode == 2


def copy_pack(prefix: Path, to: Path) -> Path:
    for ext in (".bin", ".idx", ".json"):
        shutil.copy(f"{prefix}{ext}", f"{to}{ext}")
    return to


# one change per setting `RESUME_KEYS` guards (distillation's: test_resuming_with_another_teacher_is_refused)
CHANGED_SETTINGS = {
    "init": lambda w, t: ["--init", shutil.copytree(w / "mlkv", t / "init")],  # the same weights elsewhere
    "data": lambda w, t: ["--data", copy_pack(w / "train", t / "train")],  # the same rows elsewhere
    "valid_data": lambda w, t: ["--valid-data", copy_pack(w / "valid", t / "valid")],
    "valid_rows": lambda w, t: ["--valid-rows", 3],
    "tp": lambda w, t: ["--tp", 2],
    "seed": lambda w, t: ["--seed", 7],
    "global_batch": lambda w, t: ["--ds_config", ds_config(t, "zero2.json", micro=8)],
    "total_steps": lambda w, t: ["--train-iters", 9],
    "lr": lambda w, t: ["--lr", 1e-3],
    "min_lr_ratio": lambda w, t: ["--min-lr-ratio", 0.2],
    "warmup_ratio": lambda w, t: ["--warmup-ratio", 0.1],
    "weight_decay": lambda w, t: ["--weight-decay", 0.1],
    "fp8": lambda w, t: ["--fp8"],  # torchao's float8 emulated (FP8_EMULATE): the CPU has no float8 units
}


@pytest.mark.parametrize("key", CHANGED_SETTINGS)
def test_resuming_with_a_changed_setting_is_refused_naming_it(workdir, tmp_path, key, monkeypatch):
    """A run folder started with one command, then each guarded setting changed on its own: refused,
    naming that setting with its recorded and its new value."""
    from megatron_mlkv.training import RunPlan
    from megatron_mlkv.training.plan import FP8_EMULATE, RESUME_KEYS

    assert set(CHANGED_SETTINGS) == {k for k in RESUME_KEYS if not k.startswith("distill_")}
    if key == "fp8":
        pytest.importorskip("torchao.float8")  # `make test-fp8` installs it
    argv = ["--ds_config", ds_config(workdir, "zero2.json"), "--init", workdir / "mlkv", "--data", workdir / "train"]
    argv += ["--valid-data", workdir / "valid", "--valid-rows", 2, "--out", tmp_path / "run", "--train-iters", 8]
    monkeypatch.setenv(FP8_EMULATE, "1")
    first = RunPlan(RunOptions.from_argv(list(map(str, argv))))
    first.check_resumable()
    changed = list(map(str, argv + CHANGED_SETTINGS[key](workdir, tmp_path)))  # a flag given twice: the last wins
    if key == "tp":
        monkeypatch.setenv("WORLD_SIZE", "2")
    second = RunPlan(RunOptions.from_argv(changed))
    was, now = first.run_config()[key], second.run_config()[key]
    assert was != now
    with pytest.raises(UptrainError) as refused:
        second.check_resumable()
    assert str(refused.value) == (
        f"--out {tmp_path / 'run'} holds a run with {key} = {was!r}, this command gives {now!r}; rerun the same "
        f"command to resume, or choose a new --out"
    )


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    total = 100
    f = [lr_factor(s, total, 0.2, 0.1) for s in range(total)]
    assert f[0] == pytest.approx(1 / 20) and f[19] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:19], f[1:20]))
    assert all(a >= b for a, b in zip(f[20:], f[21:]))
    assert f[-1] == pytest.approx(0.1, abs=1e-3)
    assert lr_factor(60, total, 0.2, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay


@pytest.mark.slow
def test_eval_hook_writes_results_and_survives_a_failing_task(workdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_evaluate import write_tasks

    tasks = write_tasks(workdir / "eval_tasks")
    offline = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    run = workdir / "runs" / "eval"
    args = ("--train-iters", 2, "--save-interval", 1, "--eval-tasks", "tiny_mc,tiny_lambada")
    args += ("--eval-include-path", tasks, "--eval-limit", 4)
    # killed after the last checkpoint is complete, before its evaluation: the rerun evaluates it
    killed = uptrain(
        workdir, run, ds_config(workdir, "zero2.json"), *args, env={**offline, "MLKV_FAULT": "kill-before-eval@2"}
    )
    assert killed.returncode != 0 and (run / "checkpoints" / "step_2" / "COMPLETE").is_file()
    assert (run / "eval" / "step_1.json").is_file() and not (run / "eval" / "step_2.json").exists()
    rerun = uptrain(workdir, run, ds_config(workdir, "zero2.json"), *args, env=offline)
    ok(rerun)
    assert "evaluating step_2, whose evaluation was cut short" in rerun.stdout and "already complete" in rerun.stdout
    for step in (1, 2):
        result = json.loads((run / "eval" / f"step_{step}.json").read_text())
        assert set(result["results"]) >= {"tiny_mc", "tiny_lambada"} and result["layout"]["name"] == "MLKV-2"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/tiny_mc/acc" in r for r in records)
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/tiny_mc/acc")] == [1, 2]
    # a task whose data cannot be loaded when the checkpoint is evaluated (it exists at the start): the
    # failure is logged with its reason; training goes on and finishes
    (tasks / "tiny_gone.yaml").write_text((tasks / "tiny_mc.yaml").read_text().replace("tiny_mc", "tiny_gone"))
    broken = workdir / "runs" / "eval_broken"
    args = ("--train-iters", 2, "--save-interval", 2, "--eval-tasks", "tiny_gone", "--eval-include-path", tasks)
    result = uptrain(workdir, broken, ds_config(workdir, "zero2.json"), *args, env=offline, ranks=1)
    ok(result)
    assert "evaluation at step 2 failed" in result.stderr + result.stdout
    assert sorted(losses(broken)) == [1, 2]
    assert any("eval_error" in json.loads(line) for line in (broken / "metrics.jsonl").read_text().splitlines())


@compat
def test_what_evaluation_needs_is_checked_before_the_first_step(workdir, tmp_path):
    """An unknown task, or an --init without tokenizer files, is one line before step 1, not a
    warning at every checkpoint."""

    from test_evaluate import write_tasks

    tasks = write_tasks(tmp_path / "tasks")
    assert_one_line_error(
        run_single(workdir, tmp_path, "--eval-tasks", "no_such_task_anywhere", env={"HF_HUB_OFFLINE": "1"}),
        "--eval-tasks no_such_task_anywhere: unknown task 'no_such_task_anywhere'",
    )
    bare = Path(shutil.copytree(workdir / "mlkv", tmp_path / "bare"))
    for f in bare.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            f.unlink()
    assert_one_line_error(
        run_single(workdir, tmp_path, "--eval-tasks", "tiny_mc", "--eval-include-path", tasks, init=bare),
        f"--eval-tasks needs the tokenizer of --init {bare}, which does not load",
    )


@pytest.mark.slow
def test_activation_checkpointing_and_train_tokens_change_nothing(workdir, zero2_run):
    """--train-tokens 8 x 8 rows x 64 tokens is the 8 steps of the reference run; recomputing the
    activations (K/V handed from owner to served layers across checkpointed regions) gives its losses."""
    run = workdir / "runs" / "checkpointing"
    cmd = [
        "deepspeed",
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        str(ROOT / "launch" / "uptrain.py"),
        "--ds_config",
        str(ds_config(workdir, "zero2.json")),
        "--init",
        str(workdir / "mlkv"),
        "--data",
        str(workdir / "train"),
        "--valid-data",
        str(workdir / "valid"),
        "--out",
        str(run),
        "--train-tokens",
        str(STEPS * 8 * 64),
        "--lr",
        "3e-3",
        "--save-interval",
        "8",
        "--activation-checkpointing",
    ]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    ok(subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600))
    got, ref = losses(run), losses(zero2_run)
    assert got.keys() == ref.keys()
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-6), step


def teacher_copy(workdir: Path, tmp_path: Path, name: str) -> Path:

    return Path(shutil.copytree(workdir / "base", tmp_path / name))


def test_a_bad_teacher_is_refused_before_the_first_step(workdir, tmp_path):
    base = workdir / "base"
    assert_one_line_error(
        run_single(workdir, tmp_path, "--distill-from", tmp_path / "nowhere"),
        f"--distill-from {tmp_path / 'nowhere'}: no such folder",
    )
    assert_one_line_error(  # a hub name, with no hub to ask
        run_single(workdir, tmp_path, "--distill-from", "nobody/no-such-model", env={"HF_HUB_OFFLINE": "1"}),
        "--distill-from nobody/no-such-model: not a local folder, and the hub cannot provide it",
    )
    other_vocab = teacher_copy(workdir, tmp_path, "vocab")
    cfg = json.loads((other_vocab / "config.json").read_text())
    cfg["vocab_size"] = 50
    (other_vocab / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(
        run_single(workdir, tmp_path, "--distill-from", other_vocab), "a vocabulary of 50 ids", "has 300"
    )
    other_tokens = teacher_copy(workdir, tmp_path, "tokens")  # the same size, two tokens swapped
    spec = json.loads((other_tokens / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    (a, i), (b, j) = list(vocab.items())[100:102]
    vocab[a], vocab[b] = j, i
    (other_tokens / "tokenizer.json").write_text(json.dumps(spec))
    assert_one_line_error(
        run_single(workdir, tmp_path, "--distill-from", other_tokens), "its tokenizer differs from that of --init"
    )
    for args, fragment in (
        (("--distill-from", base, "--distill-weight", 1.5), "--distill-weight 1.5 must be between 0"),
        (("--distill-from", base, "--distill-temperature", 0), "--distill-temperature 0.0 must be positive"),
        (("--distill-weight", 0.5), "--distill-weight without --distill-from"),
    ):
        assert_one_line_error(run_single(workdir, tmp_path, *args), fragment)


def test_resuming_with_another_teacher_is_refused(workdir, tmp_path):
    """A run distilled from the base, rerun with a teacher of other weights (or none): refused in one line."""
    from safetensors.torch import load_file, save_file

    from megatron_mlkv.training import RunPlan

    argv = [
        "--ds_config",
        str(ds_config(workdir, "zero2.json")),
        "--init",
        str(workdir / "mlkv"),
        "--data",
        str(workdir / "train"),
        "--out",
        str(tmp_path / "run"),
        "--distill-from",
        str(workdir / "base"),
    ]
    RunPlan(RunOptions.from_argv(argv)).check_resumable()  # what the first start records
    other = teacher_copy(workdir, tmp_path, "other")
    weights = load_file(other / "model.safetensors")
    weights = {k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()}
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    assert_one_line_error(
        run_single(workdir, tmp_path, "--distill-from", other),
        f"--out {tmp_path / 'run'} holds a run distilled from {(workdir / 'base').resolve()}; this command "
        f"gives --distill-from {other}, whose weights differ",
    )
    assert_one_line_error(run_single(workdir, tmp_path), "this command gives no --distill-from")
    assert_one_line_error(
        run_single(workdir, tmp_path, "--distill-from", workdir / "base", "--distill-weight", 0.9),
        "holds a run with distill_weight = 1.0, this command gives 0.9",
    )


@compat
def test_a_taken_rendezvous_port_is_one_line_with_a_free_one(workdir, tmp_path):
    """Another DeepSpeed job holds the port (29500 unless --master_port): one line, not DistNetworkError."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        result = run_single(workdir, tmp_path, env=env, in_process=False)
    assert_one_line_error(result, f"the rendezvous port {port} is taken", "start with `deepspeed --master_port ")


def test_one_command_per_run_folder(workdir, tmp_path):
    """While a command runs on --out (its lock names it), another is refused in one line; the folder's
    lock is released when a command ends, also when it ends with an error."""
    import socket

    run = tmp_path / "run"
    run.mkdir()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": alive.pid, "started": "now"}))
        assert_one_line_error(run_single(workdir, tmp_path), f"--out {run} is being written by process {alive.pid}")
    finally:
        alive.kill()
        alive.wait()
    result = run_single(workdir, tmp_path, "--valid-rows", 10**6)  # the dead writer's lock is taken over
    assert result.returncode == 2 and "took over the lock of process" in result.stderr
    assert not (run / ".lock").exists()  # and released at the error


def test_data_packed_with_another_tokenizer_is_refused_unless_allowed(workdir, tmp_path):
    """The same vocabulary size, two tokens swapped: the pack's ids would train the wrong embeddings.
    Refused in one line, or trained with --allow-other-tokenizer, which the run records."""

    from megatron_mlkv.training import RunPlan

    init = Path(shutil.copytree(workdir / "mlkv", tmp_path / "init"))
    spec = json.loads((init / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    (a, i), (b, j) = list(vocab.items())[100:102]
    vocab[a], vocab[b] = j, i
    (init / "tokenizer.json").write_text(json.dumps(spec))
    assert_one_line_error(
        run_single(workdir, tmp_path, init=init),
        f"--data {workdir / 'train'} was packed with another tokenizer",
        f"than the one of --init {init}",
    )
    argv = ["--ds_config", str(ds_config(workdir, "zero2.json")), "--init", str(init), "--data", str(workdir / "train")]
    plan = RunPlan(RunOptions.from_argv([*argv, "--out", str(tmp_path / "run"), "--allow-other-tokenizer"]))
    assert plan.run_config()["allow_other_tokenizer"] is True
    RunPlan(RunOptions.from_argv([*argv[:3], str(workdir / "mlkv"), *argv[4:], "--out", str(tmp_path / "ok")]))


@pytest.mark.slow
def test_ctrl_c_ends_in_one_line_and_the_rerun_resumes(workdir, tmp_path):
    """SIGINT (Ctrl-C) during uptraining: no KeyboardInterrupt traceback, one line saying how to go on
    (exit code 130); the rerun resumes from the last complete checkpoint."""
    run = tmp_path / "run"
    argv = ["--ds_config", str(ds_config(workdir, "zero2.json", micro=8)), "--init", str(workdir / "mlkv")]
    argv += ["--data", str(workdir / "train"), "--out", str(run), "--train-iters", "6", "--save-interval", "2"]
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, str(ROOT / "launch" / "uptrain.py"), *argv]
    proc = subprocess.Popen(cmd, env=clean, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and max(losses(run), default=0) >= 3:  # step_2 is complete
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == "error: interrupted; rerun the same command to continue from where it stood"
    assert 3 <= max(losses(run)) < 6 and not (run / ".lock").exists()
    rerun = subprocess.run(cmd, env=clean, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and "resuming from" in rerun.stdout, rerun.stderr[-3000:]
    assert sorted(losses(run)) == list(range(1, 7))
