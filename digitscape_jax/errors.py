"""The error type for mistakes a user can fix: shown as one line, never a traceback."""


class UserError(Exception):
    """Bad input, such as a wrong flag value, a missing file or a mismatched checkpoint."""
