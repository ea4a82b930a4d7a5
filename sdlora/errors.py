"""The one exception type that reaches the user as a one-line message instead of a traceback."""


class SdloraError(Exception):
    """Bad input or an unusable environment; the message says what to fix."""
