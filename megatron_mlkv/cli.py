"""What every command shares: its options as a dataclass whose fields generate its flags (`Options`,
`option`), a user's error as one line (`entry_point`), and the free port a launch takes (`free_port`)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import sys
from typing import Any

from .errors import MLKVError, os_error_line

# Import-time noise of other packages that concerns no user of a command, off before any command
# imports them: torchao (the `gpu` extra, for --fp8), which transformers imports whenever it loads a
# model, logs that its CUDA extensions do not load under a CPU build of torch, and torch 2.13 warns
# about two of torchao's registrations. Errors still show.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)


def _close_process_group() -> None:
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def entry_point(main):
    """Decorate an entry point's `main(argv=None) -> int`: an `MLKVError` becomes `error: MESSAGE` on
    stderr (rank 0 only) and its `exit_code` (2; 3 for a non-finite loss) instead of a traceback; so
    does an OSError (a full disk, a read-only folder: `errors.os_error_line`, exit code 2) and Ctrl-C
    (exit code 130; rerunning the command resumes, or repacks, from where it stood).

    A process group still open is closed first: left to the interpreter's exit, gloo's threads can
    abort the process ("terminate called without an active exception", exit code 250 or 134) after
    the line was printed."""

    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (MLKVError, OSError, KeyboardInterrupt) as e:
            if isinstance(e, KeyboardInterrupt):
                message, code = "interrupted; rerun the same command to continue from where it stood", 130
            elif isinstance(e, OSError) and not isinstance(e, MLKVError):
                message, code = os_error_line(e), 2
            else:
                message, code = str(e), e.exit_code
            if int(os.environ.get("RANK", 0)) == 0:
                print(f"error: {message}", file=sys.stderr, flush=True)
            _close_process_group()
            return code

    return run


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    type=None,
    *,
    flag: str | None = None,
    positional: bool = False,
    default_factory=dataclasses.MISSING,
    **argparse_kwargs,
) -> Any:
    """A field of an `Options` dataclass and its flag: `--field-name` unless `flag` names another,
    required when it has no default, a switch when its default is a bool (`flag` then spells the
    `--no-...` of a field that defaults to True), a positional argument with `positional=True`.
    `minimum=N` refuses smaller values as a usage error; any other keyword (`choices`, `nargs`,
    `metavar`) goes to `argparse.add_argument` as it is."""
    meta = dict(help=help, type=type, flag=flag, positional=positional, **argparse_kwargs)
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_name(f: dataclasses.Field) -> str:
    """A field's flag: its `flag`, else `--field-name` (a positional argument: its metavar, else its name)."""
    if f.metadata.get("positional"):
        return f.metadata.get("metavar") or f.name
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


class Options:
    """The base of every command's options (subclasses are dataclasses of `option` fields): the fields
    generate the command line (`parser`), and `from_argv` parses one into an instance. A subclass's
    `problem()` names a combination of flags that makes no sense; it is a usage error (exit code 2)."""

    @classmethod
    def parser(cls, description: str | None = None) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
        for f in dataclasses.fields(cls):
            meta = dict(f.metadata)
            kwargs = {k: v for k, v in meta.items() if k not in ("help", "type", "flag", "positional", "minimum")}
            kwargs["help"] = meta["help"]
            if f.default is False or f.default is True:
                p.add_argument(flag_name(f), dest=f.name, action=f"store_{str(not f.default).lower()}", **kwargs)
                continue
            if meta["type"] is not None:
                kwargs["type"] = meta["type"]
            if f.default is not dataclasses.MISSING:
                kwargs["default"] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                kwargs["default"] = f.default_factory()
            elif not meta["positional"]:
                kwargs["required"] = True
            if meta["positional"]:
                p.add_argument(f.name, **kwargs)
            else:
                p.add_argument(flag_name(f), dest=f.name, **kwargs)
        return p

    @classmethod
    def from_argv(cls, argv=None, description: str | None = None):
        """Parse a command line; a value below a field's minimum, or a `problem()`, is a usage error."""
        p = cls.parser(description)
        args = p.parse_args(argv)
        for f in dataclasses.fields(cls):
            minimum = f.metadata.get("minimum")
            if minimum is not None and getattr(args, f.name) < minimum:
                p.error(f"{flag_name(f)} must be >= {minimum}")
        options = cls(**vars(args))
        problem = options.problem()
        if problem:
            p.error(problem)
        return options

    def problem(self) -> str | None:
        return None


def free_port() -> int:
    """A TCP port nothing listens on now, for a process group's rendezvous (`deepspeed --master_port`):
    the default 29500 may belong to another job on the machine."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
