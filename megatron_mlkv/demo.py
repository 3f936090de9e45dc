"""The whole workflow on the CPU with no network, on an embedded default corpus.

corpus -> tokenizer -> packed rows -> a briefly pre-trained tiny GPT-NeoX (the "base") -> converted
to an MLKV layout -> uptrained with `deepspeed --num_gpus 2` and ZeRO-2 -> a table of layout, KV
size and validation loss. Every stage is the same library code users run on Pythia and The Pile.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]

# A small generative grammar: documents with learnable structure (agreement, arithmetic, repeated
# names) and a long-tailed length distribution, like web text in miniature.
NAMES = ["Ada", "Bruno", "Chen", "Dana", "Emil", "Farah", "Goran", "Hana", "Ivo", "Juno"]
ANIMALS = ["cat", "dog", "fox", "owl", "horse", "goat", "crow", "bear"]
PLACES = ["the garden", "the river", "the old mill", "the market", "the forest", "the harbour"]
VERBS = [("sees", "saw"), ("finds", "found"), ("follows", "followed"), ("feeds", "fed"), ("paints", "painted")]
ADJ = ["small", "quiet", "clever", "grey", "happy", "tired", "brave"]


def make_document(rng: random.Random) -> str:
    name = rng.choice(NAMES)
    n_sentences = max(1, min(200, int(rng.lognormvariate(2.2, 0.9))))
    sentences = []
    for _ in range(n_sentences):
        kind = rng.random()
        animal, place, (now, past) = rng.choice(ANIMALS), rng.choice(PLACES), rng.choice(VERBS)
        if kind < 0.4:
            sentences.append(f"{name} {now} a {rng.choice(ADJ)} {animal} near {place}.")
        elif kind < 0.7:
            sentences.append(f"Yesterday {name} {past} the {animal} at {place}.")
        else:
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            sentences.append(f"{name} counts {a} plus {b} {animal}s, which makes {a + b}.")
    return " ".join(sentences)


def write_corpus(path: Path, num_docs: int, seed: int = 0) -> Path:
    """A .jsonl corpus of `num_docs` generated documents (deterministic in `seed`)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for _ in range(num_docs):
            f.write(json.dumps({"text": make_document(rng)}) + "\n")
    return path


def train_tokenizer(corpus: Path, out_dir: Path, vocab_size: int = 512, max_chars: int | None = None) -> Path:
    """A byte-level BPE tokenizer trained on `corpus` (.jsonl; its first `max_chars` characters if
    given), saved as a transformers tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    eod = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[eod], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )

    def texts(f):
        seen = 0
        for line in f:
            text = json.loads(line)["text"]
            yield text
            seen += len(text)
            if max_chars is not None and seen >= max_chars:
                return

    with open(corpus) as f:
        tok.train_from_iterator(texts(f), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eod, bos_token=eod, unk_token=eod)
    fast.save_pretrained(out_dir)
    return out_dir


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

    from .data import PackedDataset

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
        idx = rows[(step * batch + np.arange(batch)) % len(ds)]
        ids = torch.from_numpy(np.stack([ds[i] for i in idx]).astype(np.int64))
        labels = ids.masked_fill(~torch.from_numpy(np.stack([ds.loss_mask(i) for i in idx])), -100)
        loss = model(ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


@torch.no_grad()
def validation_loss(logits_fn, ds, batch: int = 16, rows: int | None = None, device=None) -> float:
    """Mean next-token loss over the first `rows` rows of `ds` (all by default; real tokens only) for
    `logits_fn(ids) -> logits`, the rows collated onto `device`."""
    from .data import collate

    n = len(ds) if rows is None else min(rows, len(ds))
    total, count = 0.0, 0
    for start in range(0, n, batch):
        b = collate(ds, np.arange(start, min(n, start + batch)), device)
        logits = logits_fn(b["input_ids"])[:, :-1].float()
        labels = b["labels"][:, 1:]
        total += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
        ).item()
        count += int((labels != -100).sum())
    return total / count


def _ds_config(out: Path, micro_batch: int) -> Path:
    """ds_configs/zero2.json with a CPU-sized micro-batch (the config owns the batch size)."""
    cfg = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    path = out / "zero2_demo.json"
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="The whole MLKV workflow on the CPU in a few minutes.")
    parser.add_argument("--out", default="demo_out", help="working folder (re-created)")
    parser.add_argument("--kv-layers", type=int, default=2, help="m of the MLKV layout (default 2)")
    parser.add_argument("--kv-groups", type=int, default=1, help="g of the MLKV layout (default 1)")
    parser.add_argument("--docs", type=int, default=4000, help="training documents")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--uptrain-steps", type=int, default=120)
    args = parser.parse_args(argv)

    from transformers import GPTNeoXForCausalLM

    from .convert import convert_checkpoint
    from .data import PackedDataset, pack
    from .hf import load_pretrained

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
        str(ROOT / "launch" / "uptrain.py"),
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
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(cmd, env=env)
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
