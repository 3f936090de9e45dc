"""The study's own steps (steps.py, beside this file); run.sh calls them between the user commands.

python benchmarks/uptrain_study/study.py corpus OUT/corpus [--max-mb N]
python benchmarks/uptrain_study/study.py tokenizer OUT/corpus/train.jsonl OUT/tokenizer [--vocab 16384]
python benchmarks/uptrain_study/study.py task OUT/corpus/valid.jsonl OUT/tasks [--n 1000]
python benchmarks/uptrain_study/study.py pretrain OUT --tokens N --hidden H [--layers 12 --heads 12]
python benchmarks/uptrain_study/study.py budget OUT PERCENT --micro 64 --seq 512   # tokens and save interval
python benchmarks/uptrain_study/study.py ds-config SRC DST --micro 64
python benchmarks/uptrain_study/study.py best-sweep OUT A:T [A:T ...]   # the sweep's choice
python benchmarks/uptrain_study/study.py record-time OUT STAGE SECONDS
python benchmarks/uptrain_study/study.py summarize OUT
"""

import argparse
import json
import sys
from pathlib import Path

import steps as study  # beside this script, whose folder Python puts first on sys.path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("corpus", help="train/valid .jsonl of the installed Python sources")
    c.add_argument("out")
    c.add_argument("--max-mb", type=float, help="cap the training text (millions of characters)")
    c.add_argument("--valid-share", type=float, default=0.05)
    k = sub.add_parser("tokenizer", help="a byte-level BPE tokenizer trained on the start of the train split")
    k.add_argument("train_jsonl")
    k.add_argument("out")
    k.add_argument("--vocab", type=int, default=16384)
    k.add_argument("--sample-mb", type=float, default=50.0, help="millions of characters to train on (default 50)")
    t = sub.add_parser("task", help="the next_line lm-eval task from the validation files")
    t.add_argument("valid_jsonl")
    t.add_argument("out")
    t.add_argument("--n", type=int, default=1000)
    r = sub.add_parser("pretrain", help="pre-train the GPT-NeoX MHA base into OUT/base")
    r.add_argument("out")
    r.add_argument("--tokens", type=int, required=True)
    r.add_argument("--hidden", type=int, required=True)
    r.add_argument("--layers", type=int, default=12)
    r.add_argument("--heads", type=int, default=12)
    r.add_argument("--batch-rows", type=int, default=64)
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--minutes", type=float, help="stop planning steps beyond this wall time")
    b = sub.add_parser("budget", help="tokens and save interval of a run on PERCENT%% of the base's tokens")
    b.add_argument("out")
    b.add_argument("percent", type=float)
    b.add_argument("--micro", type=int, required=True)
    b.add_argument("--seq", type=int, required=True)
    d = sub.add_parser("ds-config", help="the shipped DeepSpeed config with the study's micro-batch")
    d.add_argument("src")
    d.add_argument("dst")
    d.add_argument("--micro", type=int, required=True)
    w = sub.add_parser("best-sweep", help="the A:T of the sweep with the lowest validation loss")
    w.add_argument("out")
    w.add_argument("grid", nargs="+")
    t2 = sub.add_parser("record-time", help="a stage's wall time into OUT/times.json")
    t2.add_argument("out")
    t2.add_argument("stage")
    t2.add_argument("seconds", type=float)
    s = sub.add_parser("summarize", help="results.json, results.md, loss_curves.png and budget.png under OUT")
    s.add_argument("out")
    a = p.parse_args()
    if a.cmd == "corpus":
        print(json.dumps(study.build_corpus(a.out, max_mb=a.max_mb, valid_share=a.valid_share), indent=2))
    elif a.cmd == "tokenizer":
        from megatron_mlkv.data.tokenizer import train_tokenizer

        print(train_tokenizer(Path(a.train_jsonl), Path(a.out), a.vocab, max_chars=int(a.sample_mb * 1e6)))
    elif a.cmd == "task":
        print(study.write_next_line_task(a.valid_jsonl, a.out, n=a.n))
    elif a.cmd == "pretrain":
        out = Path(a.out)
        print(
            json.dumps(
                study.pretrain_base(
                    str(out / "data" / "train"),
                    out / "tokenizer",
                    out / "base",
                    a.tokens,
                    a.hidden,
                    a.layers,
                    a.heads,
                    a.batch_rows,
                    lr=a.lr,
                    minutes=a.minutes,
                ),
                indent=2,
            )
        )
    elif a.cmd == "budget":
        print(*study.budget(a.out, a.percent, a.micro, a.seq))
    elif a.cmd == "ds-config":
        study.study_ds_config(a.src, a.dst, a.micro)
    elif a.cmd == "best-sweep":
        print(study.best_sweep(a.out, a.grid))
    elif a.cmd == "record-time":
        study.record_time(a.out, a.stage, a.seconds)
    else:
        print(study.format_results(study.summarize(a.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
