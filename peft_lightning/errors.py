"""The one exception type the CLI turns into a one-line message and exit code 2."""


class UsageError(ValueError):
    """Bad input a user can fix: the message says what was wrong and what to do."""
