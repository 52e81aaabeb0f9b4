"""The one exception type a user can cause.

Every mistake a user can make (bad ratio, unknown method or model, empty or over-long context,
unsupported architecture) raises :class:`KVTrimError` with a message that says what to do, so the
CLI can print it without a traceback and library users can catch a single type.
"""


class KVTrimError(ValueError):
    """A user-facing error: the message explains what went wrong and how to fix it."""
