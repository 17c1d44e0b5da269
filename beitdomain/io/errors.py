"""The one error type readers raise: it names the file, the problem and what would help."""

from __future__ import annotations

import os

from beitdomain.user import UserError


class ReaderError(UserError):
    """A file could not be turned into an image array.

    Attributes:
        path: The file (or folder) that failed, as given by the caller.
        reason: What went wrong and, where we know it, what would help.
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keeps the two fields when sent back from a worker process
        return (type(self), (self.path, self.reason))


class MissingCodecError(ReaderError):
    """A format or compression needs an optional package that is not installed."""
