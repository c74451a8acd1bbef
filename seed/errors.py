"""The two error types every failure in seed is reported with."""


class InputError(ValueError):
    """A bad image, pixel tensor or code sequence; the message names the input and what was wrong."""


class CheckpointError(RuntimeError):
    """A missing, unreadable, unsafe or mismatched checkpoint; the message names the file or weight."""
