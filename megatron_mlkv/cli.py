"""The one place where entry points turn a user's error into one line (`entry_point`), and the free port
a launch takes (`free_port`)."""

from __future__ import annotations

import functools
import os
import sys

from .errors import MLKVError, os_error_line


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


def free_port() -> int:
    """A TCP port nothing listens on now, for a process group's rendezvous (`deepspeed --master_port`):
    the default 29500 may belong to another job on the machine."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
