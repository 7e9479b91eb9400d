"""The one exception type that reaches the user as a single line instead of a traceback."""

import sys
from typing import Callable


class UsageError(ValueError):
    """Bad input (flag, file, column, split): the CLI prints the message and exits with status 2."""


def describe(error: BaseException, empty: str = "") -> str:
    """`Type: first line of the message` (at most 300 characters of it), for a one-line error."""
    text = str(error).strip()
    return f"{type(error).__name__}: {(text.splitlines()[0] if text else empty)[:300]}"


def report_usage_errors(prog: str, run: Callable[[], int]) -> int:
    """Return `run()`'s exit status; a UsageError becomes one line `prog: error: ...` and status 2."""
    try:
        return run()
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
