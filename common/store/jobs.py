"""Asynchronous jobs: records handed in now, scored by workers, collected later.

A job is a row in `jobs` and its records, cut into chunks, are messages in the tenant's
request queue (pgmq: `queue_name(REQUEST, tenant)`), both written in one transaction, so a
job is never accepted without being queued nor queued without being recorded. A worker
`read`s chunks (each hidden from other readers for a visibility timeout), scores them and
`complete`s each: the chunk's result row, its predictions in the prediction log and the
deletion of its message commit together, so a redelivered chunk (its worker died before
committing) is scored again but written once. A chunk that keeps failing is retried after
`retry_later` and, past the maximum tries, `dead_letter`ed with its reason: the job is then
`failed`. When a job ends, a message goes to the tenant's response queue.

Every call sets the transaction's tenant (`scope`), so row-level security holds each one to
the tenant it names; the queues are reachable only by the roles granted them (migration
0007). Request ids of a job's predictions are derived from the job id and the record's
position (`request_id`), so redeliveries log the same rows and feedback can name them.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from common.store.rows import Prediction, dumps, write_items
from common.store.tenants import check_tenant_id, scope

REQUEST, RESPONSE, DEAD = "req", "res", "dlq"
"""The kinds of a tenant's queues: chunks to score, jobs that ended, chunks that failed."""

STATUSES = ("queued", "running", "done", "failed")

_JOB_COLUMNS = (
    "id, tenant_id, status, records, chunks, chunks_done, error, last_error, idempotency_key,"
    " callback_url, key_id, created_at, started_at, finished_at, callback_status,"
    " callback_attempts, callback_due"
)


def queue_name(kind: str, tenant: str) -> str:
    """The pgmq queue of `kind` (REQUEST, RESPONSE, DEAD) for `tenant` (as migration 0007)."""
    if kind not in (REQUEST, RESPONSE, DEAD):
        raise ValueError(f"unknown queue kind {kind!r}")
    return f"jobs_{kind}_{check_tenant_id(tenant).replace('-', '_')}"


def request_id(job_id: str, position: int) -> str:
    """The request id of the job's record at `position` (the same on every redelivery)."""
    return str(uuid.uuid5(uuid.UUID(job_id), str(position)))


@dataclass(frozen=True)
class Job:
    """A job as its tenant sees it."""

    id: str
    tenant_id: str
    status: str
    records: int
    chunks: int
    chunks_done: int
    error: str | None
    last_error: str | None
    idempotency_key: str | None
    callback_url: str | None
    key_id: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    callback_status: str | None
    callback_attempts: int = 0
    callback_due: datetime | None = None

    @property
    def ended(self) -> bool:
        return self.status in ("done", "failed")

    @property
    def progress(self) -> float:
        """The share of chunks scored, 0 to 1."""
        return self.chunks_done / self.chunks

    def summary(self) -> dict[str, Any]:
        """The job as the response queue and callbacks carry it (JSON-ready)."""
        return {
            "job_id": self.id,
            "tenant_id": self.tenant_id,
            "status": self.status,
            "records": self.records,
            "progress": round(self.progress, 4),
            "error": self.error,
            "created_at": self.created_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
        }


def _job(row: Mapping[str, Any]) -> Job:
    return Job(**{**row, "id": str(row["id"])})


@dataclass(frozen=True)
class Chunk:
    """One request message: part of a job's records, as a worker read it."""

    msg_id: int
    read_ct: int
    enqueued_at: datetime
    tenant_id: str
    job_id: str
    chunk: int
    first_record: int
    records: list[dict[str, Any]]

    def request_ids(self) -> list[str]:
        return [request_id(self.job_id, self.first_record + i) for i in range(len(self.records))]


@dataclass(frozen=True)
class QueueDepth:
    """What an autoscaler reads of one tenant's request queue."""

    tenant_id: str
    depth: int
    visible: int
    oldest_age_seconds: float


# -- the producer (the predictor) ----------------------------------------------------------------


def submit(
    conn: psycopg.Connection[Any],
    tenant: str,
    records: Sequence[Mapping[str, Any]],
    *,
    chunk_records: int,
    idempotency_key: str | None = None,
    callback_url: str | None = None,
    key_id: str | None = None,
) -> tuple[Job, bool]:
    """Record a job of `records` and queue its chunks, in one transaction: (job, created).

    With an `idempotency_key` the tenant used before, nothing is queued and the earlier job
    is returned (created False). `conn` is in autocommit mode; validation is the caller's.
    """
    if not records:
        raise ValueError("a job needs at least one record")
    chunks = [
        list(records[start : start + chunk_records])
        for start in range(0, len(records), chunk_records)
    ]
    job_id = str(uuid.uuid4())
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        scope(conn, tenant)
        if idempotency_key is not None:
            earlier = _by_key(cur, tenant, idempotency_key)
            if earlier is not None:
                return earlier, False
        cur.execute(
            "INSERT INTO jobs (id, tenant_id, records, chunks, idempotency_key, callback_url,"
            " key_id) VALUES (%s, %s, %s, %s, %s, %s, %s)"
            f" ON CONFLICT (tenant_id, idempotency_key) DO NOTHING RETURNING {_JOB_COLUMNS}",
            [job_id, tenant, len(records), len(chunks), idempotency_key, callback_url, key_id],
        )
        row = cur.fetchone()
        if row is None:  # the same key, submitted concurrently, won
            assert idempotency_key is not None
            earlier = _by_key(cur, tenant, idempotency_key)
            assert earlier is not None
            return earlier, False
        messages = [
            Jsonb(
                {"job": job_id, "chunk": i, "first": i * chunk_records, "records": part},
                dumps=dumps,
            )
            for i, part in enumerate(chunks)
        ]
        # One pgmq.send per chunk, pipelined: send_batch's jsonb[] took 3-5x longer for
        # 1,000-record chunks (benchmarks/async_jobs).
        queue = queue_name(REQUEST, tenant)
        cur.executemany("SELECT pgmq.send(%s, %s)", [(queue, m) for m in messages])
    return _job(row), True


def _by_key(cur: psycopg.Cursor[dict[str, Any]], tenant: str, key: str) -> Job | None:
    cur.execute(
        f"SELECT {_JOB_COLUMNS} FROM jobs WHERE tenant_id = %s AND idempotency_key = %s",
        [tenant, key],
    )
    row = cur.fetchone()
    return _job(row) if row else None


def get(conn: psycopg.Connection[Any], tenant: str, job_id: str) -> Job | None:
    """`tenant`'s job `job_id`, or None (unknown, another tenant's, or not a UUID)."""
    try:
        uuid.UUID(job_id)
    except ValueError:
        return None
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        scope(conn, tenant)
        cur.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = %s", [job_id])
        row = cur.fetchone()
    return _job(row) if row else None


def results(
    conn: psycopg.Connection[Any], tenant: str, job_id: str, *, offset: int, limit: int
) -> list[dict[str, Any]]:
    """The answers of records `offset` to `offset + limit` of a job, in submission order.

    Each is shaped as /predict's (request_id, predicted_class, probabilities, model_name,
    model_version). Chunks not scored yet are missing from the list.
    """
    with conn.transaction(), conn.cursor() as cur:
        scope(conn, tenant)
        cur.execute(
            "SELECT first_record, answers FROM job_results WHERE job_id = %s"
            " AND first_record < %s AND first_record + jsonb_array_length(answers) > %s"
            " ORDER BY chunk",
            [job_id, offset + limit, offset],
        )
        answers: list[dict[str, Any]] = []
        for first, part in cur:
            lo = max(offset - first, 0)
            hi = min(offset + limit - first, len(part))
            answers.extend(part[lo:hi])
    return answers


# -- the consumer (the workers) ------------------------------------------------------------------


def consumable_tenants(conn: psycopg.Connection[Any]) -> list[str]:
    """The tenants whose request queue this connection's role may consume (read and delete)."""
    rows = conn.execute(
        "SELECT t.id FROM tenants t JOIN pg_catalog.pg_class c"
        " ON c.relname = 'q_' || mlops_queue_name(%s, t.id)"
        " AND c.relnamespace = 'pgmq'::regnamespace"
        " WHERE has_table_privilege(c.oid, 'UPDATE') AND has_table_privilege(c.oid, 'DELETE')"
        " ORDER BY t.id",
        [REQUEST],
    ).fetchall()
    return [row[0] for row in rows]


def read(
    conn: psycopg.Connection[Any], tenant: str, *, visibility_timeout: float, limit: int
) -> list[Chunk]:
    """Up to `limit` chunks of `tenant`'s request queue, hidden from other readers for
    `visibility_timeout` seconds; their jobs are marked running."""
    with conn.transaction():
        scope(conn, tenant)
        rows = conn.execute(
            "SELECT msg_id, read_ct, enqueued_at, message FROM pgmq.read(%s, %s, %s)",
            [queue_name(REQUEST, tenant), max(round(visibility_timeout), 1), limit],
        ).fetchall()
        chunks: list[Chunk] = []
        for msg_id, read_ct, enqueued_at, message in rows:
            try:
                chunks.append(_chunk(msg_id, read_ct, enqueued_at, tenant, message))
            except (KeyError, TypeError, ValueError) as exc:  # not a message `submit` wrote
                _set_aside(conn, tenant, msg_id, message, f"malformed message: {exc!r}")
        if chunks:
            conn.execute(
                "UPDATE jobs SET status = 'running', started_at = coalesce(started_at, now())"
                " WHERE id = ANY(%s::uuid[]) AND status = 'queued'",
                [sorted({c.job_id for c in chunks})],
            )
    return chunks


def _chunk(msg_id: int, read_ct: int, enqueued_at: datetime, tenant: str, message: Any) -> Chunk:
    """A request message as a Chunk; KeyError, TypeError or ValueError if it is not one."""
    records = message["records"]
    if not isinstance(records, list) or not records:
        raise ValueError("records: not a non-empty list")
    return Chunk(
        msg_id,
        read_ct,
        enqueued_at,
        tenant,
        str(uuid.UUID(str(message["job"]))),
        int(message["chunk"]),
        int(message["first"]),
        records,
    )


def _set_aside(
    conn: psycopg.Connection[Any], tenant: str, msg_id: int, message: Any, reason: str
) -> None:
    """Move a message that is no chunk to the dead-letter queue (it would block the queue)."""
    letter = {"msg_id": msg_id, "message": message, "reason": reason}
    conn.execute("SELECT pgmq.send(%s, %s)", [queue_name(DEAD, tenant), Jsonb(letter, dumps=dumps)])
    conn.execute("SELECT pgmq.delete(%s, %s::bigint)", [queue_name(REQUEST, tenant), msg_id])


def complete(
    conn: psycopg.Connection[Any],
    chunk: Chunk,
    answers: Sequence[Mapping[str, Any]],
    predictions: Sequence[Prediction],
    *,
    model_name: str,
    model_version: str,
) -> Job | None:
    """Write a scored chunk once and acknowledge it; the job if this chunk ended it.

    The result row, its `predictions` and the deletion of the message commit together; a
    chunk written before (a redelivery) only has its message deleted. `conn` is in
    autocommit mode and has had `create_staging`.
    """
    queue = queue_name(REQUEST, chunk.tenant_id)
    ended: Job | None = None
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        scope(conn, chunk.tenant_id)
        cur.execute(
            "INSERT INTO job_results (job_id, chunk, tenant_id, first_record, model_name,"
            " model_version, answers) VALUES (%s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (job_id, chunk) DO NOTHING RETURNING chunk",
            [
                chunk.job_id,
                chunk.chunk,
                chunk.tenant_id,
                chunk.first_record,
                model_name,
                model_version,
                Jsonb(list(answers), dumps=dumps),
            ],
        )
        if cur.fetchone() is not None:
            write_items(conn, predictions)
            cur.execute(
                "UPDATE jobs SET chunks_done = chunks_done + 1,"
                " status = CASE WHEN status = 'failed' THEN 'failed'"
                "  WHEN chunks_done + 1 >= chunks THEN 'done' ELSE 'running' END,"
                " finished_at = CASE WHEN status <> 'failed' AND chunks_done + 1 >= chunks"
                "  THEN now() ELSE finished_at END"
                f" WHERE id = %s RETURNING {_JOB_COLUMNS}",
                [chunk.job_id],
            )
            row = cur.fetchone()
            if row is not None and row["status"] == "done" and row["chunks_done"] == row["chunks"]:
                ended = _job(row)
                _respond(cur, ended)
        cur.execute("SELECT pgmq.delete(%s, %s::bigint)", [queue, chunk.msg_id])
    return ended


def retry_later(conn: psycopg.Connection[Any], chunk: Chunk, reason: str, *, delay: float) -> None:
    """Record why `chunk` failed and make it visible again after `delay` seconds."""
    with conn.transaction():
        scope(conn, chunk.tenant_id)
        conn.execute("UPDATE jobs SET last_error = %s WHERE id = %s", [reason, chunk.job_id])
        conn.execute(
            "SELECT pgmq.set_vt(%s, %s::bigint, %s)",
            [queue_name(REQUEST, chunk.tenant_id), chunk.msg_id, max(round(delay), 0)],
        )


def dead_letter(conn: psycopg.Connection[Any], chunk: Chunk, reason: str) -> Job | None:
    """Move `chunk` to the tenant's dead-letter queue with `reason`; its job fails.

    Returns the job if this call ended it (a job fails once, at its first dead chunk).
    """
    ended: Job | None = None
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        scope(conn, chunk.tenant_id)
        letter = {**asdict(chunk), "reason": reason}
        letter["enqueued_at"] = chunk.enqueued_at.isoformat()
        cur.execute(
            "SELECT pgmq.send(%s, %s)",
            [queue_name(DEAD, chunk.tenant_id), Jsonb(letter, dumps=dumps)],
        )
        cur.execute(
            "SELECT pgmq.delete(%s, %s::bigint)",
            [queue_name(REQUEST, chunk.tenant_id), chunk.msg_id],
        )
        cur.execute(
            "UPDATE jobs SET status = 'failed', error = %s, last_error = %s, finished_at = now()"
            f" WHERE id = %s AND status IN ('queued', 'running') RETURNING {_JOB_COLUMNS}",
            [
                f"chunk {chunk.chunk} (records {chunk.first_record}+): {reason}",
                reason,
                chunk.job_id,
            ],
        )
        row = cur.fetchone()
        if row is not None:
            ended = _job(row)
            _respond(cur, ended)
    return ended


def _respond(cur: psycopg.Cursor[Any], job: Job) -> None:
    """Tell the tenant's response queue that `job` ended, and make its callback due (in the
    caller's transaction)."""
    cur.execute(
        "SELECT pgmq.send(%s, %s)",
        [queue_name(RESPONSE, job.tenant_id), Jsonb(job.summary(), dumps=dumps)],
    )
    if job.callback_url:
        cur.execute("UPDATE jobs SET callback_due = now() WHERE id = %s", [job.id])


def claim_callbacks(
    conn: psycopg.Connection[Any], tenants: Sequence[str], *, lease: float, limit: int = 20
) -> list[Job]:
    """Up to `limit` ended jobs of `tenants` whose callback is due, each claimed for `lease`
    seconds (another worker's claim waits it out) and its attempt counted."""
    if not tenants:
        return []
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        scope(conn, tenants)
        cur.execute(
            "UPDATE jobs SET callback_due = now() + %s, callback_attempts = callback_attempts + 1"
            " WHERE id IN (SELECT id FROM jobs WHERE callback_due <= now() ORDER BY callback_due"
            "  LIMIT %s FOR UPDATE SKIP LOCKED)"
            f" RETURNING {_JOB_COLUMNS}",
            [timedelta(seconds=lease), limit],
        )
        return [_job(row) for row in cur.fetchall()]


def record_callback(
    conn: psycopg.Connection[Any], job: Job, status: str, *, retry_in: float | None = None
) -> None:
    """Note how the job's callback went (`delivered`, or why not); with `retry_in`, claim it
    again after that many seconds, else never again."""
    due = None if retry_in is None else timedelta(seconds=retry_in)
    with conn.transaction():
        scope(conn, job.tenant_id)
        conn.execute(
            "UPDATE jobs SET callback_status = %s, callback_due = now() + %s WHERE id = %s",
            [status, due, job.id],
        )


def depths(conn: psycopg.Connection[Any], tenants: Sequence[str]) -> list[QueueDepth]:
    """Each tenant's request queue: messages, visible ones, and the oldest one's age."""
    out: list[QueueDepth] = []
    for tenant in tenants:
        row = conn.execute(
            "SELECT queue_length, queue_visible_length, oldest_msg_age_sec FROM pgmq.metrics(%s)",
            [queue_name(REQUEST, tenant)],
        ).fetchone()
        assert row is not None
        out.append(QueueDepth(tenant, int(row[0]), int(row[1]), float(row[2] or 0)))
    return out


def purge(conn: psycopg.Connection[Any], tenants: Sequence[str], older_than: timedelta) -> int:
    """Remove `tenants`' jobs (and results) that ended more than `older_than` ago, and their
    response and dead-letter messages as old; the number of jobs removed."""
    removed = 0
    with conn.transaction():
        scope(conn, tenants)
        removed = conn.execute(
            "DELETE FROM jobs WHERE finished_at < now() - %s", [older_than]
        ).rowcount
        for tenant in tenants:
            for kind in (RESPONSE, DEAD):
                conn.execute(
                    sql.SQL("DELETE FROM pgmq.{} WHERE enqueued_at < now() - %s").format(
                        sql.Identifier("q_" + queue_name(kind, tenant))
                    ),
                    [older_than],
                )
    return removed
