"""Exceptions every layer may raise to the CLI.

They live at the root so that a subcommand module in any layer can raise them without
importing ``ringfence.cli`` (which sits on top of every layer).
"""
from __future__ import annotations


class UsageError(Exception):
    """Bad command-line usage discovered after parsing (exit status 2)."""


class CommandError(Exception):
    """A one-line failure to report to the user (exit status 1)."""
