"""A tenant's own predictions and labels, read back a page at a time (`GET /predictions`).

Pages follow time: rows in (ts, request_id) order, and each page's `next_cursor` resumes
right after its last row, so rows logged meanwhile are neither skipped nor repeated. The
read runs in the tenant's scope: row-level security hides every other tenant's rows.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from common.store.tenants import scope

MAX_PAGE = 1000
"""The largest page a caller may ask for."""

_COLUMNS = (
    "p.request_id::text AS request_id, p.ts, p.model_name, p.model_version, p.variant,"
    " p.inputs, p.predicted, p.probabilities, p.batch_id, f.label, f.ts AS labelled_at,"
    " f.source AS label_source"
)


@dataclass(frozen=True)
class Page:
    """Up to `limit` rows, oldest first; `next_cursor` is None on the last page."""

    rows: list[dict[str, Any]]
    next_cursor: str | None


def encode_cursor(ts: datetime, request_id: str) -> str:
    """An opaque cursor: the position of one row."""
    return base64.urlsafe_b64encode(f"{ts.isoformat()}|{request_id}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The row a cursor points at; ValueError naming the cursor if it is not one of ours."""
    try:
        ts, request_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|")
        parsed = datetime.fromisoformat(ts)
        uuid.UUID(request_id)
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"cursor {cursor!r} is not a cursor this API returned") from exc
    if parsed.tzinfo is None:
        raise ValueError(f"cursor {cursor!r} is not a cursor this API returned")
    return parsed, request_id


def read_page(
    database: ConnectionPool[psycopg.Connection[Any]],
    tenant: str,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    model_version: str | None = None,
    cursor: str | None = None,
    limit: int = 100,
) -> Page:
    """One page of `tenant`'s predictions logged in [start, end), each with its label if any."""
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be between 1 and {MAX_PAGE}, got {limit}")
    where = ["TRUE"]
    args: list[Any] = []
    if start is not None:
        where.append("p.ts >= %s")
        args.append(start)
    if end is not None:
        where.append("p.ts < %s")
        args.append(end)
    if model_version is not None:
        where.append("p.model_version = %s")
        args.append(model_version)
    if cursor is not None:
        after_ts, after_id = decode_cursor(cursor)
        where.append("(p.ts, p.request_id) > (%s, %s::uuid)")
        args += [after_ts, after_id]
    query = (
        f"SELECT {_COLUMNS} FROM predictions p"
        " LEFT JOIN feedback f ON f.tenant_id = p.tenant_id AND f.request_id = p.request_id"
        f" WHERE {' AND '.join(where)} ORDER BY p.ts, p.request_id LIMIT %s"
    )
    with database.connection() as conn, conn.transaction():
        scope(conn, tenant)
        with conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(query, [*args, limit + 1]).fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor(rows[-1]["ts"], rows[-1]["request_id"]) if more else None
    return Page(rows, next_cursor)
