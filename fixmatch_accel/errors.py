"""The one exception type that reaches the user as a single line instead of a traceback."""


class UsageError(ValueError):
    """Bad input (flag, file, column, split): the CLI prints the message and exits with status 2."""


def describe(error: BaseException, empty: str = "") -> str:
    """`Type: first line of the message` (at most 300 characters of it), for a one-line error."""
    text = str(error).strip()
    return f"{type(error).__name__}: {(text.splitlines()[0] if text else empty)[:300]}"
