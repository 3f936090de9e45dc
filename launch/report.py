"""The paper's Table 3 and the accuracy-versus-KV-memory plot from evaluation results.

python launch/report.py runs/mha runs/mlkv-6 runs/mlkv-2 --out results/table3
python launch/report.py eval/mha.json eval/mlkv-6.json --out results/table3

A run folder stands for its latest eval/step_N.json. Writes PREFIX.md (printed too), PREFIX.json and
PREFIX.png. The logic lives in megatron_mlkv/evaluation/report.py; docs/evaluate.md.
"""

import argparse
import sys

from megatron_mlkv.cli import entry_point
from megatron_mlkv.evaluation.report import build_report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "sources",
        nargs="+",
        metavar="RUN_DIR_OR_EVAL_JSON",
        help="run folders (their latest eval/step_N.json) or evaluation JSONs",
    )
    p.add_argument("--out", default="report", metavar="PREFIX", help="output prefix (default: report)")
    return p


@entry_point
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    report = build_report(args.sources, args.out)
    print(report["table"])
    print("\nwrote " + ", ".join(report["files"].values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
