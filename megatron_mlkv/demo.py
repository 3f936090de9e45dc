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


def train_tokenizer(corpus: Path, out_dir: Path, vocab_size: int = 512) -> Path:
    """A byte-level BPE tokenizer trained on `corpus`, saved as a transformers tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    eod = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eod],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    with open(corpus) as f:
        tok.train_from_iterator((json.loads(line)["text"] for line in f), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eod, bos_token=eod, unk_token=eod)
    fast.save_pretrained(out_dir)
    return out_dir


def pretrain_base(data_prefix: str, tokenizer_dir: Path, out_dir: Path, steps: int, hidden: int = 64,
                  layers: int = 6, heads: int = 8, batch: int = 8, lr: float = 3e-3, seed: int = 0) -> Path:
    """Briefly pre-train a tiny transformers `GPTNeoXForCausalLM` so there is something to uptrain.

    Plain PyTorch on purpose: the base plays the part of a Pythia checkpoint, which comes from
    elsewhere; uptraining is what this framework does.
    """
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    from .data import PackedDataset

    torch.manual_seed(seed)
    ds = PackedDataset(data_prefix)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = GPTNeoXConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, intermediate_size=4 * hidden,
                           max_position_embeddings=ds.seq_len, rotary_pct=0.25,
                           bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model = GPTNeoXForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps)))
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
