"""A batch job's prediction-log rows, written in one transaction: all of them, or none."""

from __future__ import annotations

import io
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.csv as pacsv

from common.store.connection import connect
from common.store.migrations import migrate
from common.store.rows import BATCH_LOG_COLUMNS
from common.store.tenants import check_tenant_id, scope

_COLUMNS = ", ".join(BATCH_LOG_COLUMNS)
_BATCH_STAGING = (
    "CREATE TEMP TABLE predlog_batch_in (LIKE predictions INCLUDING DEFAULTS) ON COMMIT DROP"
)
_COPY_BATCH = f"COPY predlog_batch_in ({_COLUMNS}) FROM STDIN (FORMAT csv)"
_INSERT_BATCH = (
    f"INSERT INTO predictions ({_COLUMNS})"
    f" SELECT {_COLUMNS} FROM predlog_batch_in WHERE tenant_id = %s"
    " ON CONFLICT (request_id) DO NOTHING"
)


class BatchLogWriter:
    """A batch job's predictions in one transaction: all of them, or none.

    `write` COPYs an Arrow table (`rows.log_rows`: the `predictions` table's columns and
    batch_id, inputs and probabilities as JSON text) into a staging table; `commit` inserts
    the rows not logged yet (ON CONFLICT DO NOTHING) and returns how many were new. Leaving
    the `with` block without `commit` rolls everything back. With `tenant`, every row is
    written as that tenant's, whatever the rows say.
    """

    def __init__(self, database_url: str, tenant: str | None = None) -> None:
        self._url = database_url
        self._tenant = None if tenant is None else check_tenant_id(tenant)
        self._conn: psycopg.Connection[Any] | None = None

    def __enter__(self) -> BatchLogWriter:
        migrate(self._url)
        self._conn = connect(
            self._url, autocommit=False, statement_timeout=None, application_name="predlog-batch"
        )
        self._conn.execute(_BATCH_STAGING)
        return self

    def write(self, rows: pa.Table) -> None:
        """COPY one chunk (a pyarrow Table with BATCH_LOG_COLUMNS) into staging."""
        buf = io.BytesIO()
        table = rows.select(list(BATCH_LOG_COLUMNS))
        if self._tenant is not None:
            at = BATCH_LOG_COLUMNS.index("tenant_id")
            owner = pa.array([self._tenant] * table.num_rows, pa.string())
            table = table.set_column(at, "tenant_id", owner)
        pacsv.write_csv(table, buf, pacsv.WriteOptions(include_header=False))
        with self._connection().cursor() as cur, cur.copy(_COPY_BATCH) as copy:
            copy.write(buf.getbuffer())

    def commit(self) -> int:
        """Insert what is new and commit; the number of rows inserted.

        Each tenant's rows go in under its own scope, so row-level security checks them.
        """
        conn = self._connection()
        inserted = 0
        with conn.cursor() as cur:
            tenants = [r[0] for r in cur.execute("SELECT DISTINCT tenant_id FROM predlog_batch_in")]
            for tenant in tenants:
                scope(conn, tenant)
                cur.execute(_INSERT_BATCH, [tenant])
                inserted += cur.rowcount
        conn.commit()
        return inserted

    def __exit__(self, *exc: object) -> None:
        if self._conn is not None:
            self._conn.rollback()
            self._conn.close()
            self._conn = None

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None:
            raise RuntimeError("BatchLogWriter is used outside its `with` block")
        return self._conn
