"""The prediction log without a database: write-ahead lines, a submit that never waits but
refuses what it cannot keep, the counters, close()."""

from __future__ import annotations

import json
import resource
import signal
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from common.store import (
    BATCH_LOG_COLUMNS,
    Feedback,
    Prediction,
    PredictionLog,
    dumps,
    from_line,
    log_rows,
    to_line,
)
from common.store.log import LogRefusedError
from tests.servers import free_port


def make_prediction(**changes: object) -> Prediction:
    fields: dict[str, object] = {
        "request_id": str(uuid.uuid4()),
        "ts": datetime(2026, 5, 1, 12, 30, 15, 123456, tzinfo=UTC),
        "model_name": "churn-classifier",
        "model_version": "7",
        "inputs": {"tenure": 12, "monthly_charges": 70.5, "contract": "one_year", "x": None},
        "predicted": "yes",
        "probabilities": {"no": 0.25, "yes": 0.75},
        "latency_ms": 3.5,
        "tenant_id": "acme",
    }
    return Prediction(**(fields | changes))  # type: ignore[arg-type]


def spilled_lines(spill_dir: Path) -> list[bytes]:
    return [line for path in spill_dir.glob("*.jsonl") for line in path.read_bytes().splitlines()]


@pytest.fixture
def down_url() -> str:
    """A database URL on a port where nothing listens: PostgreSQL is down."""
    return f"postgresql://postgres@127.0.0.1:{free_port()}/predlog"


def test_prediction_round_trips_through_a_spill_line() -> None:
    prediction = make_prediction()
    line = to_line(prediction)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert from_line(line) == prediction


def test_feedback_round_trips_through_a_spill_line() -> None:
    feedback = Feedback(str(uuid.uuid4()), "no", datetime.now(UTC), "acme", "key:0123456789abcdef")
    assert from_line(to_line(feedback)) == feedback


def test_non_finite_and_numpy_values_become_plain_json() -> None:
    prediction = make_prediction(
        inputs={"a": float("nan"), "b": np.float32(1.5), "c": np.int64(3)},
        probabilities={"no": np.float32(0.25), "yes": np.float64(0.75)},
    )
    doc = json.loads(to_line(prediction))
    assert doc["inputs"] == {"a": None, "b": 1.5, "c": 3}
    assert doc["probabilities"] == {"no": 0.25, "yes": 0.75}


def test_rejects_a_request_id_that_is_not_a_uuid() -> None:
    with pytest.raises(ValueError, match="UUID"):
        Feedback("42", "no", datetime.now(UTC), "acme")


def test_rejects_a_naive_timestamp() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        make_prediction(ts=datetime(2026, 5, 1))


def test_a_line_cut_short_is_not_a_row() -> None:
    line = to_line(make_prediction())
    with pytest.raises(ValueError, match="not a prediction log line"):
        from_line(line[: len(line) // 2])


def test_submit_never_blocks_when_the_database_is_down(down_url: str, tmp_path: Path) -> None:
    plog = PredictionLog(down_url, tmp_path, retry_interval=0.2)
    plog.start()
    try:
        start = time.perf_counter()
        for _ in range(1000):
            plog.submit(make_prediction())
        elapsed = time.perf_counter() - start
        assert elapsed < 1.0
        assert plog.depth == 1000
        assert not plog.db_up
    finally:
        plog.close()


def test_depth_never_counts_a_row_twice(down_url: str, tmp_path: Path) -> None:
    """A reader of `depth` while the writer retries (the predictor's queue gauge, on every
    request) sees each row once."""
    for round_ in range(5):
        plog = PredictionLog(
            down_url, tmp_path / str(round_), retry_interval=0.01, flush_interval=0.001
        )
        plog.start()
        try:
            highest = 0
            for submitted in range(1, 1001):
                plog.submit(make_prediction())
                highest = max(highest, plog.depth - submitted)
            assert highest <= 0, f"depth ran {highest} rows over what was submitted"
        finally:
            plog.close()


def test_a_row_is_in_its_segment_when_submit_returns(down_url: str, tmp_path: Path) -> None:
    """Written ahead before the answer: what the page cache holds survives a kill -9."""
    plog = PredictionLog(down_url, tmp_path, retry_interval=60)
    plog.start()
    try:
        predictions = [make_prediction() for _ in range(50)]
        submitted: list[Prediction | Feedback] = [
            *predictions,
            Feedback(predictions[0].request_id, "no", datetime.now(UTC), "acme"),
        ]
        for n, item in enumerate(submitted, 1):
            plog.submit(item)
            assert len(spilled_lines(tmp_path)) == n
        assert sorted(spilled_lines(tmp_path)) == sorted(
            to_line(i).rstrip(b"\n") for i in submitted
        )
    finally:
        plog.close(timeout=1)
    # close() keeps what PostgreSQL did not take
    assert sorted(map(from_line, spilled_lines(tmp_path)), key=to_line) == sorted(
        submitted, key=to_line
    )
    assert plog.depth == 51


def test_submit_many_writes_all_rows_or_none(down_url: str, tmp_path: Path) -> None:
    plog = PredictionLog(down_url, tmp_path, max_spill=10)
    plog.submit_many([make_prediction() for _ in range(8)])
    with pytest.raises(LogRefusedError):
        plog.submit_many([make_prediction() for _ in range(3)])
    plog.submit_many([make_prediction() for _ in range(2)])
    plog.close()
    assert len(spilled_lines(tmp_path)) == 10
    assert plog.refused == 3


def test_a_full_backlog_refuses_new_rows_and_keeps_every_acknowledged_one(
    down_url: str, tmp_path: Path
) -> None:
    plog = PredictionLog(down_url, tmp_path, max_spill=100, retry_interval=60)
    acknowledged, reasons = [], []
    for _ in range(250):
        prediction = make_prediction()
        try:
            plog.submit(prediction)
        except LogRefusedError as exc:
            reasons.append((exc.reason, exc.retry_after))
        else:
            acknowledged.append(prediction.request_id)
    assert len(reasons) == 150
    assert all("at most 100" in reason and after >= 1 for reason, after in reasons)
    assert not plog.ready()
    plog.close()

    kept = [
        item.request_id
        for item in map(from_line, spilled_lines(tmp_path))
        if isinstance(item, Prediction)
    ]
    assert sorted(kept) == sorted(acknowledged)
    assert len(acknowledged) == 100
    assert (plog.refused, plog.depth) == (150, 100)
    assert len(list(tmp_path.glob("*.jsonl"))) == 10  # sealed every tenth of the bound


def test_a_failed_write_refuses_the_row_leaves_no_torn_line_and_fails_readiness(
    down_url: str, tmp_path: Path
) -> None:
    """A file size limit stands in for a full disk: the write past it fails (EFBIG) after
    writing part of the line, which must not stay for the next line to follow."""
    plog = PredictionLog(down_url, tmp_path, retry_interval=60)
    line = len(to_line(make_prediction()))
    limit = line * 20 + line // 2
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    acknowledged, refusals = [], []
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        for _ in range(25):
            prediction = make_prediction()
            try:
                plog.submit(prediction)
            except LogRefusedError as exc:
                refusals.append(exc.reason)
            else:
                acknowledged.append(prediction.request_id)
        full = plog.ready()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert len(acknowledged) == 20
    assert len(refusals) == 5
    assert "cannot be written" in refusals[0]
    assert not full
    stats = plog.stats()
    assert (stats.refused_rows, stats.write_failures, stats.backlog_rows) == (5, 5, 20)

    time.sleep(1.1)  # the next probe of the disk
    assert plog.ready()
    after = make_prediction()
    plog.submit(after)
    plog.close()
    kept = [
        item.request_id
        for item in map(from_line, spilled_lines(tmp_path))
        if isinstance(item, Prediction)
    ]
    assert kept == [*acknowledged, after.request_id]  # every line whole, in order


def test_counts_rows_and_bytes_written_ahead_and_the_backlog(down_url: str, tmp_path: Path) -> None:
    plog = PredictionLog(down_url, tmp_path, max_spill=3, retry_interval=60)
    items = [make_prediction() for _ in range(3)]
    for item in items:
        plog.submit(item)
    with pytest.raises(LogRefusedError):
        plog.submit(make_prediction())
    stats = plog.stats()
    size = sum(len(to_line(i)) for i in items)
    assert (stats.written_rows, stats.written_bytes) == (3, size)
    assert (stats.backlog_rows, stats.backlog_bytes) == (3, size)
    assert (stats.committed_rows, stats.refused_rows, stats.rejected_rows) == (0, 1, 0)
    plog.close()


def test_fsync_lag_returns_to_zero_within_the_sync_interval(down_url: str, tmp_path: Path) -> None:
    plog = PredictionLog(down_url, tmp_path / "a", sync_interval=0.2, retry_interval=60)
    plog.start()
    try:
        plog.submit(make_prediction())
        assert plog.stats().fsync_lag >= 0
        deadline = time.monotonic() + 5
        while plog.stats().fsync_lag > 0:
            assert time.monotonic() < deadline, "never fsynced"
            time.sleep(0.05)
    finally:
        plog.close()
    every = PredictionLog(down_url, tmp_path / "b", sync_interval=0, retry_interval=60)
    every.submit(make_prediction())
    assert every.stats().fsync_lag == 0.0  # fsynced before submit returned
    every.close()


def test_a_closed_log_refuses_rows(down_url: str, tmp_path: Path) -> None:
    plog = PredictionLog(down_url, tmp_path)
    plog.close()
    with pytest.raises(LogRefusedError, match="closed"):
        plog.submit(make_prediction())
    assert not plog.ready()


def test_batch_log_rows_encode_inputs_and_probabilities_as_live_rows_do() -> None:
    features = [("tenure", "numeric"), ("contract", "categorical"), ("note", "categorical")]
    columns = {
        "tenure": np.array([12.0, np.nan, np.inf]),
        "contract": np.array(["one_year", "__missing__", 'a "quoted"\nline'], dtype=object),
        "note": np.array(["é", "\\", "__missing__"], dtype=object),
    }
    proba = np.array([[0.25, 0.75], [1.0, 0.0], [np.nan, 0.5]])
    table = log_rows(
        pa.array([str(uuid.uuid4()) for _ in range(3)]),
        columns,
        pa.array(["yes", "no", "yes"]),
        proba,
        features=features,
        classes=["no", "yes"],
        missing="__missing__",
        model_name="m",
        model_version="1",
        batch_id="b",
        ts=datetime(2026, 5, 1, tzinfo=UTC),
        latency_ms=1.0,
    )
    assert table.column_names == list(BATCH_LOG_COLUMNS)
    live_inputs = [
        {"tenure": 12.0, "contract": "one_year", "note": "é"},
        {"tenure": float("nan"), "contract": None, "note": "\\"},
        {"tenure": float("inf"), "contract": 'a "quoted"\nline', "note": None},
    ]
    live_proba = [{"no": 0.25, "yes": 0.75}, {"no": 1.0, "yes": 0.0}, {"no": None, "yes": 0.5}]
    assert [json.loads(text) for text in table.column("inputs").to_pylist()] == [
        json.loads(dumps(row)) for row in live_inputs
    ]
    assert [json.loads(text) for text in table.column("probabilities").to_pylist()] == [
        json.loads(dumps(row)) for row in live_proba
    ]
