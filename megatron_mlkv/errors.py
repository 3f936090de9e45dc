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


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what a one-line
    error quotes from a library's multi-line one."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
