"""The base of every error a user can fix: bad input, a bad setup, a damaged file.

Each concern raises its own subclass (`LayoutError`, `ConfigError`, `DataError`, ...) with one line
naming the value, what is allowed and what to do; the entry points catch `MLKVError` in one place
(`cli.entry_point`) and print that line instead of a traceback.

This file is copied next to exported checkpoints with the modules that import it (transformers
remote code): standard library only.
"""


class MLKVError(ValueError):
    """A problem with the user's input or setup; the message is one line meant for the user."""

    exit_code = 2  # what an entry point exits with (`cli.entry_point`)


class CheckpointError(MLKVError):
    """A checkpoint folder that cannot be read or written; the message names the path."""


class UptrainError(MLKVError):
    """Bad input to an uptraining run; the message names the flag, file or value."""


class BenchError(MLKVError):
    """A benchmark request that cannot run; the message names the option."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what a one-line
    error quotes from a library's multi-line one."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def os_error_line(e: OSError) -> str:
    """One line for an operating system's refusal to read or write a file: which file, and what to do."""
    import errno
    import shutil

    name = e.filename or ""
    where = f"{name}: " if name else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        free = ""
        try:
            free = f" ({shutil.disk_usage(os_dirname(name)).free:,} bytes free there)" if name else ""
        except OSError:
            pass
        return f"{where}no space left on the device{free}; free space, then rerun the same command"
    if e.errno == errno.EROFS:
        return f"{where}the file system is read-only; write elsewhere (another --out)"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"{where}permission denied; write elsewhere (another --out), or allow it"
    return f"{where}{e.strerror or first_line(e)}"


def os_dirname(path: str) -> str:
    import os

    return os.path.dirname(os.path.abspath(path)) or "."


DISK_FULL = ("No space left", "os error 28", "file write failed", "unexpected pos", "Disk quota exceeded")


def as_disk_full(e: BaseException, path: str) -> BaseException:
    """`e` as the OSError(ENOSPC) of `path` when it is a full disk in other words (torch's zip writer:
    'unexpected pos', 'file write failed'; safetensors: 'os error 28'), else `e` itself."""
    import errno

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return OSError(e.errno, e.strerror, e.filename or path)
    if any(s in str(e) for s in DISK_FULL):
        return OSError(errno.ENOSPC, "No space left on device", path)
    return e
