"""Errors a user can fix: the one :class:`QbenchError`, defined in :mod:`qbench.methods.errors`
(the lowest layer) and used by the whole harness from here."""

from __future__ import annotations

from qbench.methods.errors import QbenchError

__all__ = ["QbenchError"]
