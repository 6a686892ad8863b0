"""The one exception type users see: a problem they can fix, printed without a traceback."""


class ErwError(Exception):
    """Something is wrong with the input or the environment; the message says what and how to fix it."""
