"""The errors livestyle raises at its boundaries.

Each carries a one-line message meant for the user: it names the file, field or
value at fault and, where there is one, what to do about it. The CLI prints the
message alone, with no traceback.
"""


class LivestyleError(Exception):
    """Base of every error whose message is meant to be shown to a user as is."""


class CheckpointError(LivestyleError):
    """A checkpoint, LoRA or model folder cannot be read or does not fit the model."""
