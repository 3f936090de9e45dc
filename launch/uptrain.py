"""Uptrain a converted checkpoint with DeepSpeed (the paper's recipe by default).

deepspeed --num_gpus 2 launch/uptrain.py --ds_config ds_configs/zero2.json \
    --init ckpt/mlkv-6 --data data/pile_6m --valid-rows 200 --out runs/mlkv-6

Rerunning the same command resumes from the latest complete checkpoint. The logic lives in
megatron_mlkv/training/; docs/uptrain.md.
"""

import sys

from megatron_mlkv.cli import entry_point
from megatron_mlkv.training.options import RunOptions


@entry_point
def main(argv=None) -> int:
    from megatron_mlkv.training import main as train_main

    return train_main(RunOptions.from_argv(argv, __doc__))


if __name__ == "__main__":
    sys.exit(main())
