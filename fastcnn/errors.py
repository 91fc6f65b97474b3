"""User-facing errors: one line on stderr, a chosen exit code, no traceback (unless --debug)."""

from __future__ import annotations


class FastcnnError(Exception):
    """A failure the user can act on. ``str(err)`` is the whole message: what is wrong and what to do."""

    exit_code = 1


class UsageError(FastcnnError):
    """Bad command-line arguments (exit 2, like argparse)."""

    exit_code = 2


class DatasetError(FastcnnError):
    """A dataset folder is missing, incomplete or corrupt."""


class NotAvailableError(FastcnnError):
    """A feature was asked for that this machine or this build cannot provide."""

    exit_code = 2


class TrainingDivergedError(FastcnnError):
    """The loss became NaN or infinite."""
