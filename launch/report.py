"""The paper's Table 3 and the accuracy-versus-KV-memory plot from evaluation results.

python launch/report.py runs/mha runs/mlkv-6 runs/mlkv-2 --out results/table3
python launch/report.py eval/mha.json eval/mlkv-6.json --out results/table3

A run folder stands for its latest eval/step_N.json. Writes PREFIX.md (printed too), PREFIX.json and
PREFIX.png. The logic lives in megatron_mlkv/evaluation/report.py; docs/evaluate.md.
"""

import sys
from dataclasses import dataclass

from megatron_mlkv.cli import Options, entry_point, option
from megatron_mlkv.evaluation.report import build_report


@dataclass(kw_only=True)
class ReportOptions(Options):
    sources: list[str] = option(
        help="run folders (their latest eval/step_N.json) or evaluation JSONs",
        positional=True,
        nargs="+",
        metavar="RUN_DIR_OR_EVAL_JSON",
    )
    out: str = option("report", "output prefix (default: report)", metavar="PREFIX")


@entry_point
def main(argv=None) -> int:
    args = ReportOptions.from_argv(argv, __doc__)
    report = build_report(args.sources, args.out)
    print(report["table"])
    print("\nwrote " + ", ".join(report["files"].values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
