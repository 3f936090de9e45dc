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


# every command's options: a cli.Options dataclass in its entry point (launch/uptrain.py's in training/options.py)
COMMANDS = {
    "launch.convert": "ConvertOptions",
    "launch.evaluate": "EvaluateOptions",
    "launch.report": "ReportOptions",
    "launch.kv_cache_size": "CacheSizeOptions",
    "launch.bench_inference": "BenchOptions",
    "launch.demo": "DemoOptions",
    "data_tools.pack_pile": "PackOptions",
}


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_every_command_declares_its_flags_as_one_dataclass(module):
    import importlib

    from megatron_mlkv.cli import Options, flag_name

    cls = getattr(importlib.import_module(module), COMMANDS[module])
    assert issubclass(cls, Options) and dataclasses.is_dataclass(cls)
    usage = cls.parser().format_help()
    for f in dataclasses.fields(cls):
        assert flag_name(f) in usage, (module, f.name)
        assert f.metadata["help"], (module, f.name)  # every flag says what it does


def test_positional_list_and_switch_fields():
    from launch.bench_inference import BenchOptions
    from launch.convert import ConvertOptions
    from launch.report import ReportOptions

    report = ReportOptions.from_argv(["runs/a", "runs/b", "--out", "t3"])
    assert (report.sources, report.out) == (["runs/a", "runs/b"], "t3")
    bench = BenchOptions.from_argv(["--out", "b", "--batch-sizes", "8", "64"])
    assert (bench.batch_sizes, bench.model, bench.out.name, bench.baseline_hf) == ([8, 64], [], "b", False)
    assert BenchOptions.from_argv(["--out", "b"]).model is not bench.model  # a fresh list each time
    convert = ConvertOptions.from_argv(["--base", "b", "--out", "o", "--no-match-params", "--no-progress"])
    assert (convert.match_params, convert.progress, convert.merge, convert.random_init) == (False, False, "mean", False)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--base", "b"], "give --out (or --paper-variants with --out-root)"),
        (["--base", "b", "--paper-variants", "--out-root", "r", "--out", "o"], "--paper-variants takes --out-root"),
        (["--base", "b", "--paper-variants", "--out-root", "r", "--random-init"], "--random-init makes one layout"),
    ],
)
def test_a_combination_of_flags_that_makes_no_sense_is_a_usage_error(argv, message, capsys):
    from launch.convert import ConvertOptions

    with pytest.raises(SystemExit) as exc:
        ConvertOptions.from_argv(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err
