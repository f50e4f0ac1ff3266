"""The one error type the CLI prints as a single line (what is wrong, what to do)."""


class DdsError(Exception):
    """A user-facing error: the message says what is wrong and which command fixes it."""
