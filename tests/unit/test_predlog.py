"""The prediction log without a database: spill lines, a submit that never waits, close()."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta
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
    plog = PredictionLog(down_url, tmp_path, max_buffer=300, retry_interval=0.2)
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


def test_depth_never_counts_a_spilled_row_twice(down_url: str, tmp_path: Path) -> None:
    """The writer moves rows from memory to a spill file; a reader of `depth` meanwhile
    (the predictor's queue gauge, on every request) sees each row once."""
    for round_ in range(10):
        plog = PredictionLog(
            down_url,
            tmp_path / str(round_),
            max_buffer=300,
            retry_interval=0.01,
            flush_interval=0.001,
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


def test_close_spills_everything_to_the_file(down_url: str, tmp_path: Path) -> None:
    plog = PredictionLog(down_url, tmp_path, max_buffer=100, flush_interval=0.05)
    plog.start()
    predictions = [make_prediction() for _ in range(500)]
    submitted: list[Prediction | Feedback] = [
        *predictions,
        Feedback(predictions[0].request_id, "no", datetime.now(UTC), "acme"),
    ]
    for item in submitted:
        plog.submit(item)
    plog.close(timeout=5)

    spilled = [from_line(line) for line in spilled_lines(tmp_path)]
    assert sorted(map(to_line, spilled)) == sorted(map(to_line, submitted))
    assert plog.depth == 501
    assert plog.dropped == 0


def test_spill_keeps_the_newest_rows_and_counts_what_it_drops(
    down_url: str, tmp_path: Path
) -> None:
    plog = PredictionLog(down_url, tmp_path, max_buffer=0, max_spill=100)
    submitted = [make_prediction(ts=datetime.now(UTC) + timedelta(seconds=i)) for i in range(250)]
    for prediction in submitted:
        plog.submit(prediction)
    plog.close()

    lines = [from_line(line) for line in spilled_lines(tmp_path)]
    kept = [item.request_id for item in lines if isinstance(item, Prediction)]
    assert len(kept) == len(lines)
    assert 90 <= len(kept) <= 100
    assert plog.dropped == 250 - len(kept)
    assert plog.depth == len(kept)
    assert set(kept) == {p.request_id for p in submitted[-len(kept) :]}


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
