"""Errors reported as one line, never a traceback: the user can act on each."""


class UserError(Exception):
    """Bad input, such as a wrong flag value, a missing file or a mismatched checkpoint."""


class CorruptCheckpoint(UserError):
    """A checkpoint step that cannot be read back: partial, truncated or damaged."""


class TrainingDiverged(UserError):
    """A loss or parameter became NaN or infinite."""
