"""`python -m common.store upgrade`: bring the prediction database's schema up to date.

Run it as the database's owner (DATABASE_URL); the services' own roles may not change the
schema and refuse to start while a migration is pending.
"""

from __future__ import annotations

import argparse

from common.errors import UserError, run_cli
from common.settings import get_settings
from common.store.migrations import migrate


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m common.store", description=__doc__.splitlines()[0]
    )
    parser.add_argument("command", choices=["upgrade"])
    parser.parse_args()
    url = get_settings().database_url
    if not url:
        raise UserError("DATABASE_URL is not set: name the prediction database (as its owner)")
    applied = migrate(url)
    print(f"applied {', '.join(applied)}" if applied else "schema up to date")


if __name__ == "__main__":
    run_cli(main)
