"""An embedded corpus: documents from a small generative grammar, for the demo and the tests (no
network, no dataset download)."""

from __future__ import annotations

import json
import random
from pathlib import Path

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
