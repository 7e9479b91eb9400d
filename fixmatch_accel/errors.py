"""The one exception type that reaches the user as a single line instead of a traceback."""


class UsageError(ValueError):
    """Bad input (flag, file, column, split): the CLI prints the message and exits with status 2."""
