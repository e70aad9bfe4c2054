"""The one exception type that reaches a user as a one-line message."""


class KettleError(Exception):
    """A problem the user can act on: the message is shown as is, with no traceback."""
