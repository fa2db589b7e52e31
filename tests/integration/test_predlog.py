"""The prediction log against a real PostgreSQL, including one that goes away mid-traffic.

Each test gets its own database in the session cluster. Tests that stop the cluster
start it again before they return, whatever happens.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from common.localpg import LocalPostgres
from common.store import (
    Feedback,
    Prediction,
    PredictionLog,
    migrate,
    migration_names,
    pool,
    prediction_exists,
    to_line,
)
from tests.servers import free_port
from tests.workspace import ROOT


def make_prediction(**changes: Any) -> Prediction:
    fields: dict[str, Any] = {
        "request_id": str(uuid.uuid4()),
        "ts": datetime.now(UTC),
        "model_name": "churn-classifier",
        "model_version": "7",
        "inputs": {"tenure": 12, "monthly_charges": 70.5, "total_charges": None},
        "predicted": "yes",
        "probabilities": {"no": 0.25, "yes": 0.75},
        "latency_ms": 3.5,
        "tenant_id": "default",
    }
    return Prediction(**(fields | changes))


def wait_for(condition: Callable[[], bool], timeout: float = 10, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout} s: {what or condition}")
        time.sleep(0.05)


def query(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, connect_timeout=5) as conn:
        return conn.execute(sql, params).fetchall()


def logged_ids(url: str) -> list[str]:
    return [str(row[0]) for row in query(url, "SELECT request_id FROM predictions")]


@pytest.fixture
def database(postgres: LocalPostgres) -> str:
    """A fresh, empty database of this test's own; its URL."""
    postgres.start()  # no-op unless an earlier test left it stopped
    name = f"predlog_{uuid.uuid4().hex[:12]}"
    postgres.create_database(name)
    return postgres.url(name)


@pytest.fixture
def running(postgres: LocalPostgres) -> Iterator[LocalPostgres]:
    """The cluster, started again after the test if the test stopped it."""
    try:
        yield postgres
    finally:
        postgres.start()


def test_migrate_applies_each_migration_once_when_two_workers_start_together(
    database: str,
) -> None:
    barrier = threading.Barrier(2)
    results: list[list[str]] = []

    def worker() -> None:
        barrier.wait()
        results.append(migrate(database))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    every = migration_names()
    assert sorted(results) == [[], every]
    assert migrate(database) == []
    assert query(database, "SELECT name FROM schema_migrations ORDER BY name") == [
        (name,) for name in every
    ]


def test_a_prediction_lands_with_its_columns(database: str, tmp_path: Path) -> None:
    migrate(database)
    prediction = make_prediction()
    plog = PredictionLog(database, tmp_path, flush_interval=0.05)
    plog.start()
    plog.submit(prediction)
    wait_for(lambda: plog.depth == 0 and plog.db_up, what="written")
    plog.close()

    row = query(database, "SELECT * FROM predictions")
    assert row == [
        (
            uuid.UUID(prediction.request_id),
            prediction.ts,
            "churn-classifier",
            "7",
            {"tenure": 12, "monthly_charges": 70.5, "total_charges": None},
            "yes",
            {"no": 0.25, "yes": 0.75},
            3.5,
            None,  # batch_id: an online prediction belongs to no batch
            "default",
            "champion",  # variant: the champion answered
        )
    ]
    assert prediction_exists(database, prediction.request_id, "default") is True
    assert prediction_exists(database, str(uuid.uuid4()), "default") is False
    down = f"postgresql://postgres@127.0.0.1:{free_port()}/predlog"
    assert prediction_exists(down, prediction.request_id, "default") is None


def test_feedback_lookups_through_a_pool_survive_an_outage(
    running: LocalPostgres, database: str, tmp_path: Path
) -> None:
    """The predictor's pool answers None (not an error) while PostgreSQL is away, and its
    broken connections are replaced once it is back."""
    prediction = make_prediction()
    plog = PredictionLog(database, tmp_path, flush_interval=0.05)
    plog.start()
    plog.submit(prediction)
    plog.close()
    lookups = pool(database, max_size=2)
    lookups.open(wait=True)
    try:
        assert prediction_exists(lookups, prediction.request_id, "default") is True
        assert prediction_exists(lookups, str(uuid.uuid4()), "default") is False
        running.stop(mode="immediate")
        assert prediction_exists(lookups, prediction.request_id, "default") is None
        running.start()
        wait_for(
            lambda: prediction_exists(lookups, prediction.request_id, "default") is True,
            what="back",
        )
    finally:
        lookups.close()


def test_the_latest_label_wins_whatever_order_labels_arrive_in(
    database: str, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    one_batch, across_batches = str(uuid.uuid4()), str(uuid.uuid4())
    plog = PredictionLog(database, tmp_path, flush_interval=0.05)
    plog.start()
    # Labels for requests whose predictions were never logged are kept (no foreign key).
    for label, minutes in [("no", 1), ("yes", 2), ("maybe", 0)]:
        plog.submit(Feedback(one_batch, label, now + timedelta(minutes=minutes), "default"))
    for label, minutes in [("no", 1), ("yes", 2), ("maybe", 0)]:
        plog.submit(Feedback(across_batches, label, now + timedelta(minutes=minutes), "default"))
        wait_for(lambda: plog.depth == 0 and plog.db_up, what="written")
    plog.close()

    labels = dict(query(database, "SELECT request_id::text, label FROM feedback"))
    assert labels == {one_batch: "yes", across_batches: "yes"}


def test_a_row_postgres_refuses_is_set_aside_without_blocking_the_rest(
    database: str, tmp_path: Path
) -> None:
    good = [make_prediction() for _ in range(20)]
    bad = make_prediction(predicted="y\x00es")  # text cannot hold NUL
    plog = PredictionLog(database, tmp_path, flush_interval=0.05)
    plog.start()
    for prediction in [*good[:10], bad, *good[10:]]:
        plog.submit(prediction)
    plog.close()

    assert sorted(logged_ids(database)) == sorted(p.request_id for p in good)
    assert plog.rejected == 1
    assert plog.depth == 0
    assert bad.request_id in "".join(p.read_text() for p in tmp_path.glob("*.rejected"))


def test_every_prediction_is_logged_exactly_once_across_an_outage(
    running: LocalPostgres, database: str, tmp_path: Path
) -> None:
    spill = tmp_path / "spill"
    plog = PredictionLog(database, spill, batch_size=100, flush_interval=0.05, retry_interval=0.2)
    plog.start()
    submitted: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            prediction = make_prediction()
            plog.submit(prediction)
            submitted.append(prediction.request_id)
            time.sleep(0.0005)

    producer = threading.Thread(target=traffic)
    producer.start()
    try:
        wait_for(lambda: plog.db_up and len(logged_ids(database)) > 0, what="writing")
        running.stop(mode="immediate")
        wait_for(lambda: not plog.db_up, what="outage noticed")
        time.sleep(2)
        spilled_in_outage = plog.depth
        running.start()
        wait_for(lambda: plog.db_up, what="back up")
        time.sleep(0.5)
    finally:
        stop.set()
        producer.join()
    plog.close()

    ids = logged_ids(database)
    assert spilled_in_outage > 0
    assert len(ids) == len(submitted)
    assert set(ids) == set(submitted)
    assert (plog.depth, plog.refused, plog.rejected) == (0, 0, 0)
    stats = plog.stats()
    assert stats.committed_rows == stats.written_rows == len(submitted)
    assert not list(spill.glob("*.jsonl"))


def test_a_new_writer_replays_what_a_closed_one_spilled(
    running: LocalPostgres, database: str, tmp_path: Path
) -> None:
    spill = tmp_path / "spill"
    predictions = [make_prediction() for _ in range(300)]
    running.stop(mode="immediate")
    first = PredictionLog(database, spill, retry_interval=0.2)
    first.start()
    for prediction in predictions:
        first.submit(prediction)
    first.close()
    assert first.depth == 300
    assert list(spill.glob("*.jsonl"))

    second = PredictionLog(database, spill, flush_interval=0.05, retry_interval=0.2)
    second.start()
    time.sleep(0.3)
    assert not second.db_up
    running.start()
    wait_for(lambda: second.db_up, what="back up")  # it has created the tables by now
    wait_for(lambda: len(logged_ids(database)) == 300, what="replayed")
    second.close()

    assert sorted(logged_ids(database)) == sorted(p.request_id for p in predictions)
    assert second.depth == 0
    assert not list(spill.glob("*.jsonl"))


def test_a_spill_file_held_by_a_live_writer_is_left_to_it(database: str, tmp_path: Path) -> None:
    predictions = [make_prediction() for _ in range(10)]
    path = tmp_path / "predlog-live.jsonl"
    path.write_bytes(b"".join(map(to_line, predictions)))

    with path.open("rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        plog = PredictionLog(database, tmp_path, flush_interval=0.05)
        plog.start()
        wait_for(lambda: plog.db_up, what="connected")
        plog.close()
        assert query(database, "SELECT count(*) FROM predictions") == [(0,)]
        assert path.exists()

    plog = PredictionLog(database, tmp_path, flush_interval=0.05)
    plog.start()
    wait_for(lambda: len(logged_ids(database)) == 10, what="adopted")
    plog.close()
    assert not path.exists()


CHILD = """
import sys, uuid
from datetime import UTC, datetime
from pathlib import Path
from common.store import Prediction, PredictionLog

plog = PredictionLog(sys.argv[1], Path(sys.argv[2]), batch_size=50, flush_interval=0.01)
plog.start()
while True:
    request_id = str(uuid.uuid4())
    plog.submit(Prediction(request_id, datetime.now(UTC), "churn-classifier", "7",
                           {"tenure": 12}, "yes", {"no": 0.25, "yes": 0.75}, 1.0, "default"))
    print(request_id, flush=True)  # acknowledged: the service would answer 200 now
"""


def test_rows_acknowledged_by_a_killed_process_are_replayed_exactly_once(
    database: str, tmp_path: Path
) -> None:
    """kill -9 mid-stream: the page cache keeps what submit() wrote; another process adopts
    the dead one's segments and every acknowledged id lands once."""
    migrate(database)
    spill = tmp_path / "spill"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, database, str(spill)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    acknowledged: list[str] = []
    try:
        assert child.stdout is not None
        while len(acknowledged) < 3000:
            line = child.stdout.readline()
            assert line, f"the child stopped (exit {child.poll()})"
            acknowledged.append(line.strip())
        committed_before = len(logged_ids(database))
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    assert child.stdout is not None
    acknowledged += [line.strip() for line in child.stdout if line.endswith("\n")]
    child.stdout.close()
    assert 0 < committed_before < len(acknowledged), "the kill should fall mid-stream"
    assert list(spill.glob("*.jsonl"))

    plog = PredictionLog(database, spill, flush_interval=0.05)
    plog.start()
    try:
        wait_for(lambda: plog.db_up and plog.depth == 0, timeout=30, what="replayed")
    finally:
        plog.close()

    counts = dict(query(database, "SELECT request_id::text, count(*) FROM predictions GROUP BY 1"))
    missing = [i for i in acknowledged if i not in counts]
    assert missing == []
    assert max(counts.values()) == 1
    assert not list(spill.glob("*.jsonl"))
