"""Errors a user can act on, and the CLI wrapper that prints them without a traceback."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

# Library warnings that say nothing actionable about this project's data or models.
_QUIET = (
    "The specified dataset source can be interpreted in multiple ways",
    "Hint: Inferred schema contains integer column",
)


class UserError(Exception):
    """Bad input or configuration: the message says what is wrong and where."""


def run_cli(main: Callable[[], object]) -> None:
    """Run a stage's main(); a UserError becomes one paragraph on stderr and exit code 1."""
    for text in _QUIET:
        warnings.filterwarnings("ignore", message=text)
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
