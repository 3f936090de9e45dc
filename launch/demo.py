"""`make demo`: the whole workflow on the CPU with no network, on an embedded default corpus.

corpus -> tokenizer -> packed rows -> a briefly pre-trained tiny GPT-NeoX (the "base") -> converted
to an MLKV layout -> uptrained with `deepspeed --num_gpus 2` and ZeRO-2 -> a table of layout, KV
size and validation loss. Every stage is the same library code users run on Pythia and The Pile; this
script only chains them (about 200 lines: the tiny base it pre-trains plays the part of a Pythia
checkpoint, which comes from elsewhere).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from megatron_mlkv.cli import Options, free_port, option

# run from the repository root (`make demo`), as the user commands are
DS_CONFIG = Path("ds_configs/zero2.json")
UPTRAIN = Path("launch/uptrain.py")


def pretrain_base(
    data_prefix: str,
    tokenizer_dir: Path,
    out_dir: Path,
    steps: int,
    hidden: int = 64,
    layers: int = 6,
    heads: int = 8,
    batch: int = 8,
    lr: float = 3e-3,
    seed: int = 0,
) -> Path:
    """Briefly pre-train a tiny transformers `GPTNeoXForCausalLM` so there is something to uptrain.

    Plain PyTorch on purpose: the base plays the part of a Pythia checkpoint, which comes from
    elsewhere; uptraining is what this framework does.
    """
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    from megatron_mlkv.data import PackedDataset, collate

    torch.manual_seed(seed)
    ds = PackedDataset(data_prefix)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = GPTNeoXConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=ds.seq_len,
        rotary_pct=0.25,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = GPTNeoXForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    rows = np.random.default_rng(seed).permutation(len(ds))
    for step in tqdm(range(steps), desc="pre-train base", unit="step"):
        b = collate(ds, rows[(step * batch + np.arange(batch)) % len(ds)])
        loss = model(b["input_ids"], labels=b["labels"]).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def _ds_config(out: Path, micro_batch: int) -> Path:
    """ds_configs/zero2.json with a CPU-sized micro-batch (the config owns the batch size)."""
    cfg = json.loads(DS_CONFIG.read_text())
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    path = out / "zero2_demo.json"
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    return path


@dataclass(kw_only=True)
class DemoOptions(Options):
    out: str = option("demo_out", "working folder (re-created)")
    kv_layers: int = option(2, "m of the MLKV layout (default 2)", int)
    kv_groups: int = option(1, "g of the MLKV layout (default 1)", int)
    docs: int = option(4000, "training documents", int)
    seq_len: int = option(128, "tokens per packed row (default 128)", int)
    pretrain_steps: int = option(400, "steps of the tiny base's pre-training (default 400)", int)
    uptrain_steps: int = option(120, "uptraining steps (default 120)", int)


def main(argv=None) -> int:
    args = DemoOptions.from_argv(argv, "The whole MLKV workflow on the CPU in a few minutes.")
    if not (DS_CONFIG.is_file() and UPTRAIN.is_file()):
        print(f"error: {DS_CONFIG} or {UPTRAIN} not found; run from the repository root (make demo)", file=sys.stderr)
        return 2

    from transformers import GPTNeoXForCausalLM

    from megatron_mlkv.conversion import convert_checkpoint
    from megatron_mlkv.data import PackedDataset, pack
    from megatron_mlkv.data.synthetic import write_corpus
    from megatron_mlkv.data.tokenizer import train_tokenizer
    from megatron_mlkv.evaluation.harness import validation_loss
    from megatron_mlkv.loading import load_pretrained

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    print("1/6 corpus and tokenizer")
    train_txt = write_corpus(out / "corpus" / "train.jsonl", args.docs, seed=0)
    valid_txt = write_corpus(out / "corpus" / "valid.jsonl", max(50, args.docs // 20), seed=1)
    tok = train_tokenizer(train_txt, out / "tokenizer")
    print("2/6 pack")
    pack([str(train_txt)], str(tok), args.seq_len, str(out / "data" / "train"), progress=False)
    pack([str(valid_txt)], str(tok), args.seq_len, str(out / "data" / "valid"), progress=False)
    valid = PackedDataset(str(out / "data" / "valid"))
    print("3/6 pre-train a tiny MHA GPT-NeoX base")
    base = pretrain_base(str(out / "data" / "train"), tok, out / "base", steps=args.pretrain_steps)
    print("4/6 convert")
    report = convert_checkpoint(str(base), out / "converted", args.kv_layers, args.kv_groups, progress=False)
    print(
        f"    {report['base_layout']} -> {report['layout']}: parameters {report['parameters']['before']:,} -> "
        f"{report['parameters']['after']:,}"
    )
    print("5/6 uptrain: deepspeed --num_gpus 2, ZeRO-2")
    run = out / "run"
    cmd = [
        "deepspeed",
        "--num_gpus",
        "2",
        "--master_port",  # not the default 29500, which another DeepSpeed job may hold
        str(free_port()),
        str(UPTRAIN),
        "--ds_config",
        str(_ds_config(out, micro_batch=8)),
        "--init",
        str(out / "converted"),
        "--data",
        str(out / "data" / "train"),
        "--valid-data",
        str(out / "data" / "valid"),
        "--out",
        str(run),
        "--train-iters",
        str(args.uptrain_steps),
        "--lr",
        "2e-3",
        "--save-interval",
        str(max(1, args.uptrain_steps // 2)),
        "--log-interval",
        "10",
    ]
    result = subprocess.run(cmd)
    if result.returncode != 0:
        print(f"error: uptraining failed (exit code {result.returncode}): {' '.join(cmd)}", file=sys.stderr)
        return result.returncode
    print("6/6 validation")
    base_model = GPTNeoXForCausalLM.from_pretrained(base).eval()
    rows = [("base", base, lambda ids: base_model(ids).logits, report["base_layout"], report["kv_heads"]["before"])]
    for label, folder in (("converted", out / "converted"), ("uptrained", run / "hf" / f"step_{args.uptrain_steps}")):
        model = load_pretrained(folder).eval()
        rows.append((label, folder, model, model.config.layout.name, model.config.layout.kv_heads_total()))
    head_dim = load_pretrained(out / "converted").config.head_dim
    lines = ["| model | layout | KV heads | KV bytes/token (fp16) | validation loss |", "|---|---|---|---|---|"]
    for label, _, fn, layout, heads in rows:
        loss = validation_loss(fn, valid)
        lines.append(f"| {label} | {layout} | {heads} | {2 * heads * head_dim * 2:,} | {loss:.4f} |")
    table = "\n".join(lines)
    print(table)
    (out / "results.md").write_text(table + "\n")
    print(f"\nTensorBoard: tensorboard --logdir {run / 'tensorboard'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
