"""Tenants (customers), their API keys, and the tenant scope of a transaction.

A key is `mlops_<key_id>_<secret>`: 16 hex characters that find its row, then 256 random
bits of which only the SHA-256 is stored. It is shown once, when created. A rotation makes
a new key and leaves the old ones working until their grace period ends; a revocation ends
a key at once (a trigger notifies `KEYS_CHANNEL`, so caches of key checks drop it).

Row-level security shows a service only the rows of the tenant(s) its transaction set with
`scope`; outside a scope it sees nothing.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

from common.errors import UserError
from common.store.connection import connect

TENANT_ID = re.compile(r"^[a-z0-9-]{1,32}$")
DEFAULT_TENANT = "default"
"""The tenant of a single-team install, batch jobs by default, and rows from before tenants."""
SCOPES = ("predict", "feedback", "admin")
DEFAULT_SCOPES = ("predict", "feedback")
KEYS_CHANNEL = "mlops_api_keys"
"""NOTIFY channel: a key_id whose key was revoked, rotated out or removed."""
ROTATION_GRACE = timedelta(hours=24)
"""How long the old keys keep working after `rotate_key`, unless told otherwise."""
READER_ROLE_PREFIX = "tenant_"
"""A tenant's read-only SQL role is tenant_<id> (the policies match on that name)."""

_KEY = re.compile(r"^mlops_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
_GUC = "mlops.tenant"


@dataclass(frozen=True)
class Identity:
    """Who a valid key speaks for."""

    tenant_id: str
    key_id: str
    scopes: frozenset[str]


@dataclass(frozen=True)
class Tenant:
    id: str
    name: str
    created_at: datetime
    live_keys: int


@dataclass(frozen=True)
class KeyInfo:
    key_id: str
    tenant_id: str
    scopes: tuple[str, ...]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True)
class NewKey:
    """A key just created: `secret` is the whole key, shown once and stored nowhere."""

    key_id: str
    tenant_id: str
    scopes: tuple[str, ...]
    secret: str


# -- the scope of a transaction ------------------------------------------------------------------


def scope(conn: psycopg.Connection[Any], tenants: str | Sequence[str]) -> None:
    """Let this transaction see `tenants` (one id, or several for flows and the operator).

    Call it inside `conn.transaction()`: the setting ends with the transaction, so a pooled
    connection never carries a tenant into the next request.
    """
    ids = [tenants] if isinstance(tenants, str) else list(tenants)
    for tenant in ids:
        check_tenant_id(tenant)
    conn.execute("SELECT set_config(%s, %s, true)", [_GUC, ",".join(ids)])


def check_tenant_id(tenant: str) -> str:
    """`tenant` if it is a valid id, else a UserError saying what one looks like."""
    if not TENANT_ID.match(tenant):
        raise UserError(
            f"tenant id {tenant!r} is not valid: 1 to 32 characters of a-z, 0-9 and '-'"
        )
    return tenant


def tenant_ids(conn: psycopg.Connection[Any]) -> list[str]:
    """Every tenant's id (the flows role and the operator may list them)."""
    return [r[0] for r in conn.execute("SELECT id FROM tenants ORDER BY id")]


# -- keys ----------------------------------------------------------------------------------------


def _admin(database_url: str) -> psycopg.Connection[Any]:
    """A connection for the tenants CLI and the operator's scripts (named in pg_stat_activity)."""
    return connect(database_url, application_name="mlops-admin")


def _sha256(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def parse_key(key: str) -> tuple[str, str] | None:
    """(key_id, secret) of a well-formed key, else None."""
    found = _KEY.match(key)
    return (found.group(1), found.group(2)) if found else None


def authenticate(database: ConnectionPool[Any] | str, key: str) -> Identity | None:
    """The identity of a live key; None for a malformed, unknown, expired or revoked one.

    One call of `mlops_authenticate`, a SECURITY DEFINER function: the predictor's role
    cannot read the key table itself.
    """
    parsed = parse_key(key)
    if parsed is None:
        return None
    key_id, secret = parsed
    query = "SELECT tenant_id, scopes FROM mlops_authenticate(%s, %s)"
    args = [key_id, _sha256(secret)]
    if isinstance(database, str):
        with connect(database, application_name="mlops-auth") as conn:
            row = conn.execute(query, args).fetchone()
    else:
        with database.connection() as conn:
            row = conn.execute(query, args).fetchone()
    if row is None:
        return None
    return Identity(tenant_id=row[0], key_id=key_id, scopes=frozenset(row[1]))


def _check_scopes(scopes: Sequence[str]) -> tuple[str, ...]:
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise UserError(f"scopes {unknown or '(none)'} are not valid; choose from {list(SCOPES)}")
    return tuple(s for s in SCOPES if s in scopes)


def _insert_key(conn: psycopg.Connection[Any], tenant: str, scopes: Sequence[str]) -> NewKey:
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    conn.execute(
        "INSERT INTO api_keys (key_id, tenant_id, secret_sha256, scopes) VALUES (%s, %s, %s, %s)",
        [key_id, tenant, _sha256(secret), list(scopes)],
    )
    return NewKey(key_id, tenant, tuple(scopes), f"mlops_{key_id}_{secret}")


def _require_tenant(conn: psycopg.Connection[Any], tenant: str) -> None:
    check_tenant_id(tenant)
    if conn.execute("SELECT 1 FROM tenants WHERE id = %s", [tenant]).fetchone() is None:
        raise UserError(f"no tenant {tenant!r}; add it first: mlops tenants add {tenant}")


def create_key(database_url: str, tenant: str, scopes: Sequence[str] = DEFAULT_SCOPES) -> NewKey:
    """A new live key for `tenant`; the returned `secret` is the only copy."""
    checked = _check_scopes(scopes)
    with _admin(database_url) as conn, conn.transaction():
        _require_tenant(conn, tenant)
        return _insert_key(conn, tenant, checked)


def rotate_key(
    database_url: str,
    tenant: str,
    scopes: Sequence[str] | None = None,
    grace: timedelta = ROTATION_GRACE,
) -> tuple[NewKey, list[str]]:
    """A new key for `tenant`; its other live keys now expire after `grace`.

    Both keep working during the overlap; revoke the old ones early once every client has
    the new one. Returns the new key and the ids of the keys that will expire. The new key
    has `scopes`, else the union of the old keys' scopes, else the default ones.
    """
    with _admin(database_url) as conn, conn.transaction():
        _require_tenant(conn, tenant)
        old = conn.execute(
            "SELECT key_id, scopes FROM api_keys WHERE tenant_id = %s AND revoked_at IS NULL"
            " AND (expires_at IS NULL OR expires_at > now()) FOR UPDATE",
            [tenant],
        ).fetchall()
        inherited = {s for _, row_scopes in old for s in row_scopes}
        new = _insert_key(
            conn, tenant, _check_scopes(scopes or sorted(inherited) or DEFAULT_SCOPES)
        )
        conn.execute(
            "UPDATE api_keys SET expires_at = LEAST(coalesce(expires_at, 'infinity'), now() + %s)"
            " WHERE key_id = ANY(%s)",
            [grace, [r[0] for r in old]],
        )
    return new, [r[0] for r in old]


def revoke_key(database_url: str, tenant: str, key_id: str | None = None) -> list[str]:
    """Revoke one key of `tenant` (or, with no `key_id`, all of them) now; their ids.

    A key id of another tenant is an error, as an unknown one is.
    """
    with _admin(database_url) as conn, conn.transaction():
        _require_tenant(conn, tenant)
        query = sql.SQL(
            "UPDATE api_keys SET revoked_at = now() WHERE tenant_id = %s AND revoked_at IS NULL{}"
            " RETURNING key_id"
        ).format(sql.SQL(" AND key_id = %s") if key_id else sql.SQL(""))
        args = [tenant, key_id] if key_id else [tenant]
        revoked = [r[0] for r in conn.execute(query, args)]
    if key_id and not revoked:
        raise UserError(
            f"tenant {tenant!r} has no live key {key_id!r} (see: mlops tenants keys list {tenant})"
        )
    return revoked


def list_keys(database_url: str, tenant: str) -> list[KeyInfo]:
    """Every key of `tenant`, newest first (ids and dates only; secrets are not kept)."""
    with _admin(database_url) as conn:
        _require_tenant(conn, tenant)
        rows = conn.execute(
            "SELECT key_id, tenant_id, scopes, created_at, expires_at, revoked_at FROM api_keys"
            " WHERE tenant_id = %s ORDER BY created_at DESC, key_id",
            [tenant],
        ).fetchall()
    return [KeyInfo(r[0], r[1], tuple(r[2]), r[3], r[4], r[5]) for r in rows]


# -- tenants -------------------------------------------------------------------------------------


def add_tenant(database_url: str, tenant: str, name: str | None = None) -> Tenant:
    """Record a new tenant; an existing id is an error (ids are never reused silently)."""
    check_tenant_id(tenant)
    with _admin(database_url) as conn:
        try:
            row = conn.execute(
                "INSERT INTO tenants (id, name) VALUES (%s, %s) RETURNING created_at",
                [tenant, name or tenant],
            ).fetchone()
        except psycopg.errors.UniqueViolation:
            raise UserError(f"tenant {tenant!r} exists already (see: mlops tenants list)") from None
    assert row is not None
    return Tenant(tenant, name or tenant, row[0], 0)


def list_tenants(database_url: str) -> list[Tenant]:
    """Every tenant, with its number of live keys."""
    with _admin(database_url) as conn:
        rows = conn.execute(
            "SELECT t.id, t.name, t.created_at, count(k.key_id) FILTER (WHERE k.revoked_at IS NULL"
            " AND (k.expires_at IS NULL OR k.expires_at > now()))"
            " FROM tenants t LEFT JOIN api_keys k ON k.tenant_id = t.id"
            " GROUP BY t.id ORDER BY t.id"
        ).fetchall()
    return [Tenant(*r) for r in rows]


def remove_tenant(database_url: str, tenant: str, *, purge: bool = False) -> dict[str, int]:
    """Remove a tenant and its keys (at once); with `purge`, its predictions and labels too.

    Returns how many rows went from each table. Without `purge` its logged rows stay, under
    its id, for the operator's records: adding the id again gives them back to it.
    """
    with _admin(database_url) as conn, conn.transaction():
        _require_tenant(conn, tenant)
        removed: dict[str, int] = {}
        scope(conn, tenant)
        if purge:
            for table in (
                "feedback",
                "predictions",
                "monitoring_metrics",
                "monitoring_runs",
                "jobs",  # and their results, by cascade
            ):
                cur = conn.execute(
                    sql.SQL("DELETE FROM {} WHERE tenant_id = %s").format(sql.Identifier(table)),
                    [tenant],
                )
                removed[table] = cur.rowcount
        removed["api_keys"] = conn.execute(
            "DELETE FROM api_keys WHERE tenant_id = %s", [tenant]
        ).rowcount
        conn.execute("DELETE FROM tenants WHERE id = %s", [tenant])
        role = READER_ROLE_PREFIX + tenant
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role]).fetchone():
            # Its grants (its response queue) go first, or PostgreSQL refuses the drop.
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    return removed


def create_reader_role(database_url: str, tenant: str) -> tuple[str, str]:
    """A read-only SQL role for `tenant`'s consumers: (role name, password, shown once).

    It sees only `tenant`'s predictions, labels and jobs, whatever it sets, and consumes only
    its own response queue (`jobs.queue_name("res", tenant)`); running this again
    gives the role a new password.
    """
    role = READER_ROLE_PREFIX + tenant
    password = secrets.token_urlsafe(24)
    with _admin(database_url) as conn, conn.transaction():
        _require_tenant(conn, tenant)
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role]).fetchone()
        verb = "ALTER" if exists else "CREATE"
        conn.execute(
            sql.SQL(verb + " ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
        conn.execute(sql.SQL("GRANT mlops_tenant_reader TO {}").format(sql.Identifier(role)))
        conn.execute("SELECT mlops_tenant_queues(%s)", [tenant])  # its response queue
    return role, password
