"""RunOptions: the dataclass that generates launch/uptrain.py's command line."""

import dataclasses

import pytest

from megatron_mlkv.training.options import RunOptions

REQUIRED = ["--ds_config", "c.json", "--init", "ckpt", "--data", "rows", "--out", "run"]


def test_defaults_and_flags_come_from_the_dataclass():
    opts = RunOptions.from_argv(REQUIRED)
    assert opts == RunOptions("c.json", "ckpt", "rows", "run")
    assert (opts.lr, opts.warmup_ratio, opts.min_lr_ratio, opts.compile, opts.loss) == (6e-4, 0.2, 0.1, True, "auto")
    changed = RunOptions.from_argv(
        REQUIRED + ["--no-compile", "--activation-checkpointing", "--tp", "2", "--lr", "1e-3", "--eval-limit", "5"]
    )
    assert (changed.compile, changed.activation_checkpointing, changed.tp, changed.lr, changed.eval_limit) == (
        False,
        True,
        2,
        1e-3,
        5,
    )
    assert RunOptions.from_argv(REQUIRED + ["--local_rank=1"]).local_rank == 1  # as the deepspeed launcher passes it
    usage = RunOptions.parser().format_help()
    for f in dataclasses.fields(RunOptions):
        if f.name != "local_rank":  # the deepspeed launcher's, hidden
            assert (f.metadata["flag"] or "--" + f.name.replace("_", "-")) in usage, f.name


@pytest.mark.parametrize(
    "extra", [[], ["--save-interval", "0"], ["--log-interval", "-1"], ["--loss", "cheap"], ["--tp", "two"]]
)
def test_bad_command_lines_are_usage_errors(extra, capsys):
    argv = REQUIRED[2:] if not extra else REQUIRED + extra  # [] drops the required --ds_config
    with pytest.raises(SystemExit) as exc:
        RunOptions.from_argv(argv)
    assert exc.value.code == 2 and "error:" in capsys.readouterr().err
