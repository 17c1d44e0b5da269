"""The error type for problems a user can fix (bad input, impossible request)."""


class UserError(ValueError):
    """A problem with the user's input or request; the message says what to change."""
