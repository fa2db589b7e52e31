"""Where the databases, buckets and state directories are, and the services that use them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import psycopg

from common.errors import UserError
from scripts.ops.tools import pg_tool, run
from scripts.stack import BUCKETS, DATABASES, JOB_WORKERS, Stack

CLIENTS = ("predictor", *JOB_WORKERS, "prefect-worker", "evidently", "prefect-server", "mlflow")
"""The stack's services that hold connections or files, stopped around a restore/upgrade."""

COMPOSE_CLIENTS = "mlflow prefect-server prefect-worker evidently predictor worker"


@dataclass
class Target:
    """Where the databases and buckets are, and (local topology) the stack that uses them."""

    pg_url: str  # the server, no database: postgresql://user[:password]@host:port
    s3: Any
    stack: Stack | None = None
    databases: tuple[str, ...] = DATABASES
    buckets: tuple[str, ...] = BUCKETS
    state_dirs: dict[str, Path] = field(default_factory=dict)
    """Directories of state kept as files (name -> live path): the Evidently workspace."""

    def db_url(self, database: str) -> str:
        parts = urlsplit(self.pg_url)
        return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, ""))

    def libpq(self, database: str) -> tuple[str, dict[str, str]]:
        """`database`'s URL without the password, and an environment carrying it (PGPASSWORD)."""
        parts = urlsplit(self.db_url(database))
        env = dict(os.environ)
        userinfo, _, hostport = parts.netloc.rpartition("@")
        user, _, password = userinfo.partition(":")
        if password:
            env["PGPASSWORD"] = unquote(password)
        netloc = f"{user}@{hostport}" if user else hostport
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, "")), env

    def owner(self, database: str) -> str | None:
        """The role that owns `database`, or None if there is no such database."""
        with psycopg.connect(self.db_url("postgres")) as conn:
            row = conn.execute(
                "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", [database]
            ).fetchone()
        return str(row[0]) if row else None

    @contextmanager
    def clients_stopped(self, clients: tuple[str, ...] = CLIENTS) -> Iterator[list[str]]:
        """Stop these services of the stack for the block (no-op without a local stack).

        They start again only if the block succeeds: after a failure they stay stopped,
        so that nothing runs on a half-restored stack, and the error says how to start them.
        """
        if self.stack is None:
            try:
                yield []
            except Exception as exc:
                raise UserError(
                    f"{exc}\nKeep the clients stopped until this is resolved; then start them "
                    f"(compose: `docker compose start {COMPOSE_CLIENTS}`)."
                ) from exc
            return
        states = self.stack.states()
        running = [name for name in clients if states.get(name) == "RUNNING"]
        if running:
            print(f"stopping {', '.join(running)}")
            self.stack.ctl("stop", *running)
        try:
            yield running
        except Exception as exc:
            hint = (
                f"\nThe stopped services stay stopped ({', '.join(running)}). Once this is "
                f"resolved, start them: python -m scripts.ops --home {self.stack.home} "
                "start-clients"
                if running
                else ""
            )
            raise UserError(f"{exc}{hint}") from exc
        self.start_clients(running)

    def start_clients(self, names: list[str]) -> None:
        """Start these services, servers before their clients, each waited on to be healthy."""
        if self.stack is None:
            return
        for name in reversed(names):  # mlflow and prefect-server before their clients
            print(f"starting {name}")
            self.stack.start(name)
            self.stack.wait_healthy(name)


def dump(target: Target, db: str, out: Path, snapshot: str | None = None) -> None:
    """`pg_dump -Fc` of one database into `out` (at an exported snapshot, if given)."""
    url, env = target.libpq(db)
    extra = [f"--snapshot={snapshot}"] if snapshot else []
    run([pg_tool("pg_dump"), "-Fc", *extra, "-f", str(out), url], f"pg_dump {db}", env)


def keys(s3: Any, bucket: str) -> Iterator[dict[str, Any]]:
    """Every object of `bucket`: Key, Size, ETag (quotes stripped)."""
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            yield {"Key": str(obj["Key"]), "Size": int(obj["Size"]), "ETag": _etag(obj["ETag"])}


def _etag(raw: object) -> str:
    return str(raw).strip('"')


def table_counts(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """Exact row counts of every table of the database (schema.table -> rows)."""
    tables = conn.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
        " AND n.nspname NOT LIKE 'pg_toast%%' AND n.nspname NOT LIKE 'pg_temp%%'"
        " ORDER BY 1, 2"
    ).fetchall()
    counts: dict[str, int] = {}
    for schema, table in tables:
        row = conn.execute(
            psycopg.sql.SQL("SELECT count(*) FROM {}").format(psycopg.sql.Identifier(schema, table))
        ).fetchone()
        counts[f"{schema}.{table}"] = int(row[0]) if row else 0
    return counts
