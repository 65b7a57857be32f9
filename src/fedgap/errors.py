"""User-facing errors.

Anything the user can fix (a bad config key, a missing data file, an unwritable output folder) is raised as
``FedgapError`` with a message that fits on one line and names the key or file. The CLI prints it and exits
with code 2; it never shows a traceback for these.
"""

from __future__ import annotations


class FedgapError(Exception):
    """An error caused by user input or the environment; printed as one line, exit code 2."""

    exit_code = 2


class ConfigError(FedgapError):
    """A config key or value is wrong."""


class DataError(FedgapError):
    """A data file is missing, truncated or corrupted."""
