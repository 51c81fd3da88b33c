"""Errors a user can fix. The CLI prints them on one line and exits with status 2.

Defined here, in the lowest layer, so methods can raise them without importing the
harness; :mod:`qbench.harness.errors` re-exports the same class.
"""

from __future__ import annotations


class QbenchError(Exception):
    """Bad input: a malformed suite, an unknown name, a missing file.

    ``where`` names the file and key path (``suites/x.yaml: experiments[0].bits[1]``).
    """

    def __init__(self, message: str, where: str | None = None):
        self.message = message
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)
