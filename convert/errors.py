"""Errors a user can cause. Every message says what went wrong and what to do.

Owns the exception hierarchy shared by convert/, engine/ and the CLI. The CLI
prints ``error: <message>`` for any :class:`MoestreamError` and exits 2;
tracebacks only appear with ``--debug``.
"""

from __future__ import annotations


class MoestreamError(Exception):
    """Base class for errors caused by input, files or settings (not bugs)."""


class ModelFormatError(MoestreamError):
    """A model file or folder is missing, truncated, corrupt or inconsistent."""


class ChecksumError(ModelFormatError):
    """A shard's recorded SHA-256 does not match its bytes."""


class UnsupportedModelError(MoestreamError):
    """The checkpoint's architecture is not one moestream implements."""


class BudgetError(MoestreamError):
    """The memory budget cannot hold the model; the message gives the minimum."""


class SettingError(MoestreamError, ValueError):
    """An environment setting (``MOESTREAM_*``) holds a value moestream does not accept; the CLI reports it in one line."""
