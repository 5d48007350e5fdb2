"""UsageError: what the operator asked for cannot be done as asked (exit 2).

In a module of its own so that a command raising it (accounts, status --html, run) does not
import the whole pipeline only to name it.
"""

from __future__ import annotations


class UsageError(Exception):
    """The request cannot run as asked (exit 2); the message says what to change."""
