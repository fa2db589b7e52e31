"""The one way to open a connection to the prediction database (log, feedback, monitoring).

Every connection gets the same client encoding and the same dead-server detection, so a
PostgreSQL that vanishes mid-call fails the call within seconds instead of hanging a
writer thread, a flow or a batch job for minutes. What differs per caller (autocommit,
statement timeout, the name shown in `pg_stat_activity`) is a parameter.
"""

from __future__ import annotations

import re
from typing import Any

import psycopg

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
    options: dict[str, Any] = {}
    if statement_timeout is not None:
        options["options"] = f"-c statement_timeout={round(statement_timeout * 1000)}"
    return psycopg.connect(
        conninfo(database_url),
        autocommit=autocommit,
        connect_timeout=connect_timeout,
        client_encoding="utf8",
        # A server that vanishes mid-call must fail the call, not hang the caller for minutes.
        keepalives=1,
        keepalives_idle=5,
        keepalives_interval=2,
        keepalives_count=2,
        tcp_user_timeout=10_000,
        application_name=application_name,
        **options,
    )
