"""The prediction database's schema: `migrations/NNNN_*.sql`, applied once each, in order.

The project owns its migrations (the prediction log, feedback, monitoring results, jobs);
each runs in the same transaction as its row in `schema_migrations`, under an advisory
lock, so several workers starting at once apply each exactly once. One step is not a file
of ours: `0006_pgmq` is the SQL the `pgmq` package ships (the queue of async jobs),
installed SQL-only, so no PostgreSQL extension package is needed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from pgmq.install import get_embedded_install_sql

from common.errors import UserError
from common.store.connection import connect

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_MIGRATION_FILE = re.compile(r"^\d{4}_[a-z0-9_]+\.sql$")
# pg_advisory_xact_lock key held while migrating; any constant no other code uses.
_MIGRATION_LOCK_KEY = 0x7072_6564_6C6F_67  # "predlog"


PACKAGED: dict[str, Callable[[], str]] = {"0006_pgmq": get_embedded_install_sql}
"""Steps whose SQL a package ships: pgmq's schema and functions (pgmq 1.13's SQL-only install)."""


def _steps() -> list[tuple[str, Callable[[], str]]]:
    """Every migration, in order: (name, its SQL)."""
    files = {p.stem: p.read_text for p in MIGRATIONS_DIR.iterdir() if _MIGRATION_FILE.match(p.name)}
    return sorted({**files, **PACKAGED}.items())


def migration_names() -> list[str]:
    """The names of every migration, in the order they apply."""
    return [name for name, _ in _steps()]


def pending(conn: psycopg.Connection[Any], names: list[str] | None = None) -> list[str]:
    """The migrations not applied yet on `conn`'s database, in order."""
    names = names if names is not None else migration_names()
    try:
        with conn.transaction():
            done = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
    except (psycopg.errors.UndefinedTable, psycopg.errors.InsufficientPrivilege):
        return names  # a database from before migrations, or a role that may not tell
    return [n for n in names if n not in done]


def apply_migrations(conn: psycopg.Connection[Any]) -> list[str]:
    """Apply pending migrations on `conn` (autocommit) in one transaction; their names.

    The advisory lock serialises workers: the second waits, then finds nothing to do.
    """
    steps = _steps()
    if not pending(
        conn, [name for name, _ in steps]
    ):  # a service role reads this, but may not migrate
        return []
    applied: list[str] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", [_MIGRATION_LOCK_KEY])
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
        for name, read in steps:
            if name in done:
                continue
            conn.execute(read().encode())
            conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", [name])
            applied.append(name)
    return applied


def migrate(database_url: str) -> list[str]:
    """Apply the migrations not yet applied, in order; return their names.

    Safe when several workers start at once: the second waits for the first, then finds
    nothing to do.
    """
    with connect(database_url) as conn:
        try:
            applied = apply_migrations(conn)
        except psycopg.errors.InsufficientPrivilege as exc:
            user = conn.info.user
            raise UserError(
                f"the prediction database's schema is behind ({', '.join(pending(conn))} not "
                f"applied) and {user!r} may not change it: run `python -m common.store upgrade` "
                f"with the owner's DATABASE_URL first ({exc.diag.message_primary})"
            ) from exc
    if applied:
        log.info("prediction log: applied migrations %s", ", ".join(applied))
    return applied
