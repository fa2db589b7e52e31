"""The jobs store on a real PostgreSQL with pgmq's SQL: submit, read, complete, dead-letter,
idempotency, and who may reach which queue."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import psycopg
import pytest
from psycopg.types.json import Jsonb

from common.store import connect, create_staging, jobs, roles, tenants
from tests.integration import scoring

pytestmark = pytest.mark.integration

RECORD = {"tenure_months": 3, "plan": "basic"}
MODEL = "m"


@pytest.fixture
def db(jobs_db: dict[str, str]) -> dict[str, str]:
    """A migrated database with tenants a-1 and b, URLs per role (conftest's jobs_db)."""
    return jobs_db


def test_a_submitted_job_is_scored_in_chunks_and_read_back_in_order(db: dict[str, str]) -> None:
    with connect(db["predictor"]) as conn:
        job, created = jobs.submit(
            conn, "a-1", [{**RECORD, "i": i} for i in range(25)], chunk_records=10
        )
    assert created
    assert job.status == "queued"
    assert job.chunks == 3
    ended = scoring.drain(db["worker"], "a-1", MODEL)
    assert [j.id for j in ended] == [job.id]
    with connect(db["predictor"]) as conn:
        done = jobs.get(conn, "a-1", job.id)
        page = jobs.results(conn, "a-1", job.id, offset=5, limit=12)
    assert done is not None
    assert done.status == "done"
    assert done.progress == 1
    assert [a["request_id"] for a in page] == [jobs.request_id(job.id, i) for i in range(5, 17)]
    with connect(db["admin"]) as conn:
        logged = conn.execute("SELECT count(*) FROM predictions WHERE tenant_id = 'a-1'").fetchone()
        response = conn.execute(
            "SELECT message FROM pgmq.read(%s, 30, 10)", [jobs.queue_name(jobs.RESPONSE, "a-1")]
        ).fetchall()
    assert logged == (25,)  # each record logged once, for monitoring and feedback
    assert [m[0]["job_id"] for m in response] == [job.id]


def test_a_redelivered_chunk_is_written_once(db: dict[str, str]) -> None:
    with connect(db["predictor"]) as conn:
        job, _ = jobs.submit(conn, "b", [RECORD] * 4, chunk_records=4)
    with connect(db["worker"]) as conn:
        create_staging(conn)
        first = jobs.read(conn, "b", visibility_timeout=1, limit=1)[0]
        again = None
        for _ in range(30):  # its visibility timeout passes: it comes back
            chunks = jobs.read(conn, "b", visibility_timeout=30, limit=1)
            again = next((c for c in chunks if c.msg_id == first.msg_id), None)
            if again:
                break
            conn.execute("SELECT pg_sleep(0.1)")
        assert again is not None
        assert again.read_ct == 2
        for chunk in (first, again):
            scoring.score(conn, chunk, MODEL)
    with connect(db["predictor"]) as conn:
        done = jobs.get(conn, "b", job.id)
        assert done is not None
        assert (done.status, done.chunks_done) == ("done", 1)
        assert len(jobs.results(conn, "b", job.id, offset=0, limit=100)) == 4


def test_an_idempotency_key_returns_the_first_job_and_queues_nothing_more(
    db: dict[str, str],
) -> None:
    with connect(db["predictor"]) as conn:
        first, created = jobs.submit(conn, "b", [RECORD], chunk_records=10, idempotency_key="k")
        second, again = jobs.submit(conn, "b", [RECORD] * 3, chunk_records=10, idempotency_key="k")
        other, _ = jobs.submit(conn, "a-1", [RECORD], chunk_records=10, idempotency_key="k")
    assert created
    assert not again
    assert second.id == first.id
    assert second.records == 1
    assert other.id != first.id  # keys are per tenant
    with connect(db["worker"]) as conn:
        assert [d.depth for d in jobs.depths(conn, ["b", "a-1"])] == [1, 1]


def test_a_dead_lettered_chunk_fails_its_job_with_the_reason(db: dict[str, str]) -> None:
    with connect(db["predictor"]) as conn:
        job, _ = jobs.submit(conn, "b", [RECORD] * 2, chunk_records=1)
    with connect(db["worker"]) as conn:
        create_staging(conn)
        chunk = jobs.read(conn, "b", visibility_timeout=30, limit=1)[0]
        failed = jobs.dead_letter(conn, chunk, "ValueError: boom")
        assert failed is not None
        assert failed.status == "failed"
        assert "boom" in (failed.error or "")
    scoring.drain(db["worker"], "b", MODEL)  # the other chunk still scores; the job stays failed
    with connect(db["admin"]) as conn:
        letters = conn.execute(
            "SELECT message FROM pgmq.read(%s, 30, 10)", [jobs.queue_name(jobs.DEAD, "b")]
        ).fetchall()
    assert [m[0]["reason"] for m in letters] == ["ValueError: boom"]
    with connect(db["predictor"]) as conn:
        after = jobs.get(conn, "b", job.id)
    assert after is not None
    assert (after.status, after.chunks_done) == ("failed", 1)


def test_tenants_reach_only_their_own_jobs_and_queues(db: dict[str, str]) -> None:
    with connect(db["predictor"]) as conn:
        job_b, _ = jobs.submit(conn, "b", [RECORD], chunk_records=10)
        assert jobs.get(conn, "a-1", job_b.id) is None
    scoring.drain(db["worker"], "b", MODEL)
    role, password = tenants.create_reader_role(db["admin"], "a-1")
    reader = roles.role_url(db["admin"], role, password)
    with connect(reader) as conn:
        assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM job_results").fetchone() == (0,)
        conn.execute("SELECT * FROM pgmq.read(%s, 30, 1)", [jobs.queue_name(jobs.RESPONSE, "a-1")])
        for kind in (jobs.RESPONSE, jobs.REQUEST):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT * FROM pgmq.read(%s, 30, 1)", [jobs.queue_name(kind, "b")])
    tenants.remove_tenant(db["admin"], "a-1")  # its grants do not block dropping its role


def test_purge_removes_ended_jobs_past_retention(db: dict[str, str]) -> None:
    with connect(db["predictor"]) as conn:
        job, _ = jobs.submit(conn, "b", [RECORD], chunk_records=10)
    scoring.drain(db["worker"], "b", MODEL)
    with connect(db["worker"]) as conn:
        assert jobs.purge(conn, ["b"], timedelta(hours=1)) == 0
        assert jobs.purge(conn, ["b"], timedelta(0)) == 1
    with connect(db["predictor"]) as conn:
        assert jobs.get(conn, "b", job.id) is None


def test_a_message_that_is_no_chunk_is_set_aside_without_blocking_the_queue(
    db: dict[str, str],
) -> None:
    with connect(db["admin"]) as conn:
        for bad in ({"job": "nope"}, {"job": str(uuid.uuid4()), "chunk": 0, "first": 0}, [1]):
            conn.execute(
                "SELECT pgmq.send(%s, %s)", [jobs.queue_name(jobs.REQUEST, "b"), Jsonb(bad)]
            )
    with connect(db["predictor"]) as conn:
        job, _ = jobs.submit(conn, "b", [RECORD], chunk_records=10)
    ended = scoring.drain(db["worker"], "b", MODEL)
    assert [j.id for j in ended] == [job.id]
    with connect(db["admin"]) as conn:
        letters = conn.execute(
            "SELECT message FROM pgmq.read(%s, 30, 10)", [jobs.queue_name(jobs.DEAD, "b")]
        ).fetchall()
    assert len(letters) == 3
    assert all(m[0]["reason"].startswith("malformed message: ") for m in letters)


def test_a_callback_is_claimed_by_one_worker_at_a_time_until_it_is_recorded(
    db: dict[str, str],
) -> None:
    with connect(db["predictor"]) as conn:
        job, _ = jobs.submit(
            conn, "b", [RECORD], chunk_records=10, callback_url="http://127.0.0.1:9/hook"
        )
    scoring.drain(db["worker"], "b", MODEL)
    with connect(db["worker"]) as conn:
        (claimed,) = jobs.claim_callbacks(conn, ["b"], lease=0.5)
        assert (claimed.id, claimed.callback_attempts) == (job.id, 1)
        assert jobs.claim_callbacks(conn, ["b"], lease=0.5) == []  # leased to the first
        time.sleep(0.6)  # that worker died before recording: the lease ends, it comes back
        (again,) = jobs.claim_callbacks(conn, ["b"], lease=30)
        assert again.callback_attempts == 2
        jobs.record_callback(conn, again, "HTTP 500", retry_in=0)
        (third,) = jobs.claim_callbacks(conn, ["b"], lease=30)
        jobs.record_callback(conn, third, "delivered")
        assert jobs.claim_callbacks(conn, ["b"], lease=0) == []
        assert jobs.claim_callbacks(conn, ["a-1"], lease=0) == []
    with connect(db["predictor"]) as conn:
        done = jobs.get(conn, "b", job.id)
    assert done is not None
    assert (done.callback_status, done.callback_attempts, done.callback_due) == (
        "delivered",
        3,
        None,
    )
