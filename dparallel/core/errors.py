"""User-facing errors: the CLI prints one line and exits with code 2, no traceback."""

from __future__ import annotations

import errno


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


# errno -> (what went wrong, the fix) for the OS failures a user causes and can mend
_OS_FAILURES = {
    errno.EACCES: ("permission denied", "choose a folder you can write (run_dir=...) or fix its permissions"),
    errno.EPERM: ("permission denied", "choose a folder you can write (run_dir=...) or fix its permissions"),
    errno.EROFS: ("read-only file system", "point run_dir at a writable disk"),
    errno.ENOSPC: (
        "no space left on the device",
        "free space or point run_dir at another disk (the last good checkpoint and finished shards are kept)",
    ),
    errno.EDQUOT: ("disk quota exceeded", "free space or point run_dir at another disk"),
    errno.ENOTDIR: ("a file is in the way where a folder is expected", "remove it or choose another path"),
    errno.EISDIR: ("a folder is where a file is expected", "pass the path of a file"),
    errno.ENOENT: ("no such file or folder", "check the path"),
}


def describe_os_error(error: OSError) -> str | None:
    """One line for an OS failure the user can mend (permission, space, path kind, missing path), or None for
    one that is not theirs to mend (a bug: the CLI keeps its traceback)."""
    if error.errno not in _OS_FAILURES:
        return None
    what, fix = _OS_FAILURES[error.errno]
    where = f" at {error.filename}" if error.filename else ""
    return f"{what}{where}: {fix}"
