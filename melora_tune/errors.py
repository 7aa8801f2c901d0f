"""Errors a user can fix: the CLI prints them as one line and exits with status 2."""


class UsageError(ValueError):
    """Bad input (arguments, config, targets): the message names the problem and the fix."""
