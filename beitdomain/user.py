"""The error type for problems a user can fix (bad input, impossible request).

Every error a user can act on is a `UserError` (or a subclass): the command line prints its
message as one line and exits 2. Anything else is a bug and shows a traceback.
"""


class UserError(ValueError):
    """A problem with the user's input or request; the message says what to change."""


class MissingPathError(FileNotFoundError, UserError):
    """A file or folder the user named does not exist; the message names it."""
