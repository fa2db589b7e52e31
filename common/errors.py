"""Errors a user can act on, and the CLI wrapper that prints them without a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input or configuration: the message says what is wrong and where."""


def run_cli(main: Callable[[], object]) -> None:
    """Run a stage's main(); a UserError becomes one paragraph on stderr and exit code 1."""
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
