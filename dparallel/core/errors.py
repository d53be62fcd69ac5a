"""User-facing errors: the CLI prints one line and exits with code 2, no traceback."""

from __future__ import annotations


class DParallelError(Exception):
    """Bad input from the user (recipe, file, id). The message names the problem and the fix on one line."""

    exit_code = 2


def require(condition: bool, message: str) -> None:
    """Raise :class:`DParallelError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise DParallelError(message)


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty): what a one-line error
    quotes of a library's multi-line failure."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
