"""The one error the embedded stack raises for settings, URIs and services it cannot run."""

from __future__ import annotations


class StackError(RuntimeError):
    """The stack cannot start or stop as asked; the message says why and what to do."""
