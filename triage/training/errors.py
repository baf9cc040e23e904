"""Errors of the training package, importable without torch (the CLI parser needs them)."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input: the data set is malformed or inconsistent, an option is out of range, or a
    run cannot go on (it diverged); the message is one line saying where and what to do."""
