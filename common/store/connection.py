"""The one way to open a connection (or a pool of them) to the prediction database.

Every connection gets the same client encoding and the same dead-server detection, so a
PostgreSQL that vanishes mid-call fails the call within seconds instead of hanging a
writer thread, a flow or a batch job for minutes. What differs per caller (autocommit,
statement timeout, the name shown in `pg_stat_activity`) is a parameter.
"""

from __future__ import annotations

import re
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

CONNECT_TIMEOUT = 2
"""Seconds to wait for a connection; libpq honours nothing shorter."""

STATEMENT_TIMEOUT = 30.0
"""Seconds a statement may run by default; long reads and COPYs pass None."""


def conninfo(database_url: str) -> str:
    """libpq wants postgresql://; accept the SQLAlchemy spelling postgresql+psycopg:// too."""
    return re.sub(r"^postgres(?:ql)?(?:\+\w+)?://", "postgresql://", database_url)


def connect(
    database_url: str,
    *,
    autocommit: bool = True,
    statement_timeout: float | None = STATEMENT_TIMEOUT,
    connect_timeout: int = CONNECT_TIMEOUT,
    application_name: str = "predlog",
) -> psycopg.Connection[Any]:
    """A connection to `database_url` (DATABASE_URL, either spelling).

    With `autocommit` (the default) transactions are explicit: `conn.transaction()`.
    `statement_timeout` None lets a statement run as long as it needs.
    """
    return psycopg.connect(
        conninfo(database_url),
        **_options(autocommit, statement_timeout, connect_timeout, application_name),
    )


def pool(
    database_url: str,
    *,
    max_size: int = 4,
    statement_timeout: float | None = 5.0,
    application_name: str = "predlog-pool",
) -> ConnectionPool[psycopg.Connection[Any]]:
    """A pool of autocommit connections for short reads on a request path, not yet open.

    Open it in the process that uses it (after any fork: `pool.open(wait=False)`), so a
    server that starts while PostgreSQL is away still starts; `getconn` then waits up to
    CONNECT_TIMEOUT and raises `psycopg_pool.PoolTimeout`. Connections that broke while the
    server was away are checked and replaced before they are handed out.
    """
    return ConnectionPool(
        conninfo(database_url),
        kwargs=_options(True, statement_timeout, CONNECT_TIMEOUT, application_name),
        min_size=1,
        max_size=max_size,
        timeout=CONNECT_TIMEOUT,
        check=ConnectionPool.check_connection,
        open=False,
        name=application_name,
    )


def _options(
    autocommit: bool, statement_timeout: float | None, connect_timeout: int, application_name: str
) -> dict[str, Any]:
    """The keyword arguments of every connection: same encoding, same dead-server detection."""
    options: dict[str, Any] = {}
    if statement_timeout is not None:
        options["options"] = f"-c statement_timeout={round(statement_timeout * 1000)}"
    return {
        "autocommit": autocommit,
        "connect_timeout": connect_timeout,
        "client_encoding": "utf8",
        # A server that vanishes mid-call must fail the call, not hang the caller for minutes.
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 2,
        "tcp_user_timeout": 10_000,
        "application_name": application_name,
        **options,
    }
