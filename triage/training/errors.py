"""Errors of the training package, importable without torch (the CLI parser needs them)."""

from __future__ import annotations


class DataError(ValueError):
    """The data set is malformed or inconsistent (message says where)."""
