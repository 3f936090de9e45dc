"""Uptraining the Llama family through the real `deepspeed` launcher on the CPU: a tiny random
`LlamaForCausalLM` (GQA, Llama-3 rope scaling, tied) saved by transformers, converted to MLKV, uptrained
distilled from itself with the evaluation hook; killed during a save and resumed (the uninterrupted run
is the oracle); TP=2 against TP=1. The launcher, ZeRO stages and the rest of uptraining are the same
code as GPT-NeoX's (test_uptrain.py); ZeRO-3 against ZeRO-2 for the family: test_engine.py."""

import json
from pathlib import Path

import pytest
import torch
from helpers import llama_family
from test_uptrain import STEPS, assert_same_run, assert_same_weights, ds_config, ok, records, uptrain
from test_uptrain import workdir as workdir  # noqa: F401 (the fixture: tokenizer, packs, a GPT-NeoX base)

from megatron_mlkv.conversion import convert_checkpoint

STEPS_LLAMA = STEPS // 2


@pytest.fixture(scope="module")
def llama(workdir):  # noqa: F811
    """The Llama base (with the packs' tokenizer) and its MLKV-4 conversion (m = 2 owners, g = 2 of g_b = 4
    K/V heads: under TP=2 each rank owns one, the sharded case; test_uptrain.py has the replicated one)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(workdir / "tok")
    base = workdir / "llama_base"
    llama_family(
        "llama", vocab_size=len(tok), max_position_embeddings=64, eos_token_id=tok.eos_token_id
    ).save_pretrained(base)
    tok.save_pretrained(base)
    convert_checkpoint(str(base), workdir / "llama_mlkv", kv_layers=2, kv_groups=2, progress=False)
    return base


def llama_args(base: Path, tasks: Path | None = None):
    args = ["--train-iters", STEPS_LLAMA, "--save-interval", 2, "--distill-from", base]
    return args + (["--eval-tasks", "tiny_mc", "--eval-include-path", tasks, "--eval-limit", 4] if tasks else [])


@pytest.fixture(scope="module")
def llama_run(workdir, llama):  # noqa: F811
    """ZeRO-2 on 2 ranks, distilled from the Llama base, evaluated at each checkpoint."""
    from test_evaluate import write_tasks

    tasks = write_tasks(workdir / "llama_tasks")
    run = workdir / "runs" / "llama"
    offline = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    ok(
        uptrain(
            workdir,
            run,
            ds_config(workdir, "zero2.json"),
            *llama_args(llama, tasks),
            init=workdir / "llama_mlkv",
            env=offline,
        )
    )
    return run


@pytest.mark.slow
def test_llama_uptrains_distilled_and_evaluated_into_an_mlkv_export(workdir, llama_run):  # noqa: F811
    from transformers import AutoModelForCausalLM

    from megatron_mlkv.evaluation.report import build_report
    from megatron_mlkv.loading import load_pretrained

    train = [r for r in records(llama_run) if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS_LLAMA + 1)) and all(r["kl"] > 0 for r in train)
    assert [r["step"] for r in records(llama_run) if "valid_kl" in r] == [2, 4]
    for step in (2, 4):
        result = json.loads((llama_run / "eval" / f"step_{step}.json").read_text())
        assert "tiny_mc" in result["results"] and result["layout"]["name"] == "MLKV-4"
    export = llama_run / "hf" / f"step_{STEPS_LLAMA}"
    hf = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()
    assert (
        hf.config.model_type == "mlkv_llama"
        and hf.config.kv_owner == [0, 0, 2, 2]
        and hf.config.num_key_value_heads == 2
    )
    x = torch.randint(0, hf.config.vocab_size, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, load_pretrained(export).eval()(x))
    saved = json.loads((llama_run / "run_config.json").read_text())
    assert saved["layout"]["kv_heads_total"] == 4 and saved["teacher_fingerprint"]
    report = build_report([llama_run], workdir / "llama_report")  # the run's latest evaluation, as Table 3
    (row,) = report["rows"]
    assert row["layout"] == "MLKV-4" and row["kv_heads"] == 4 and (workdir / "llama_report.png").is_file()


@pytest.mark.slow
def test_llama_killed_during_a_save_resumes_with_identical_losses(workdir, llama, llama_run):  # noqa: F811
    run = workdir / "runs" / "llama_kill"
    args = (*llama_args(llama), "--keep-last", 1)
    config, init = ds_config(workdir, "zero2.json"), workdir / "llama_mlkv"
    killed = uptrain(workdir, run, config, *args, init=init, env={"MLKV_FAULT": "kill-in-save@4"})
    assert killed.returncode != 0 and not (run / "checkpoints" / "step_4" / "COMPLETE").exists()
    ok(uptrain(workdir, run, config, *args, init=init))
    key = lambda r: (r["step"], r["loss"], r["ce"], r["kl"])  # noqa: E731
    assert [key(r) for r in records(run) if "loss" in r] == [key(r) for r in records(llama_run) if "loss" in r]


@pytest.mark.slow
def test_llama_tp2_matches_tp1(workdir, llama, llama_run):  # noqa: F811
    """The family's plan (RMSNorm entering the region, gate/up/down split), a K/V head on each rank
    (sharded), the teacher sharded alike: TP=2 x DP=1 (micro-batch 8) against TP=1 x DP=2 (4)."""
    run = workdir / "runs" / "llama_tp2"
    config = ds_config(workdir, "zero2.json", micro=8)
    ok(uptrain(workdir, run, config, *llama_args(llama), "--tp", 2, init=workdir / "llama_mlkv"))
    assert_same_run(run, llama_run)
    export = Path("hf") / f"step_{STEPS_LLAMA}"
    assert_same_weights(run / export, llama_run / export)  # the TP shards merged into the TP=1 layout
