"""The rows of the prediction log: their types, their one JSON encoding, and how they are written.

A live prediction (`Prediction`, one per request) and a batch job's predictions (an Arrow
table from `log_rows`, one chunk at a time) land in the same `predictions` table, with the
same columns (`LOG_COLUMNS`) and the same JSON in `inputs` and `probabilities`: an object
keyed by feature or class name, NaN and infinity as null (jsonb has no NaN), a missing
category as null, text escaped as `json.dumps` escapes it. `dumps` encodes one value;
`log_rows` builds the same text column-wise, so a million batch rows never meet a Python
loop.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    import psycopg

LOG_COLUMNS = (
    "request_id",
    "ts",
    "model_name",
    "model_version",
    "inputs",
    "predicted",
    "probabilities",
    "latency_ms",
)
"""Columns of a logged prediction, as the `predictions` table names them."""

BATCH_LOG_COLUMNS = (*LOG_COLUMNS, "batch_id")
"""Columns of a batch job's log rows (`log_rows`): a prediction's, and the batch it is from."""


# -- one row -----------------------------------------------------------------------------


def _check_row(request_id: str, ts: datetime) -> None:
    """Refuse at the boundary what PostgreSQL would refuse later, in a batch with others."""
    uuid.UUID(request_id)  # ValueError if not a UUID
    if ts.tzinfo is None or ts.utcoffset() is None:
        raise ValueError(f"ts must be timezone-aware, got {ts!r}")


@dataclass(frozen=True)
class Prediction:
    """One answered request, as monitoring reads it back."""

    request_id: str
    ts: datetime
    model_name: str
    model_version: str
    inputs: dict[str, Any]
    predicted: str
    probabilities: dict[str, float]
    latency_ms: float

    def __post_init__(self) -> None:
        _check_row(self.request_id, self.ts)


@dataclass(frozen=True)
class Feedback:
    """The true label of an earlier request; a later one (by `ts`) replaces it."""

    request_id: str
    label: str
    ts: datetime

    def __post_init__(self) -> None:
        _check_row(self.request_id, self.ts)


Item: TypeAlias = Prediction | Feedback


# -- JSON ----------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """JSON fallback: numpy scalars and arrays as numbers and lists, dates as ISO text."""
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    if isinstance(value, datetime | date):
        return value.isoformat()
    return str(value)


def _finite(value: Any) -> Any:
    """`value` with NaN/inf as null and keys as text: jsonb has no NaN."""
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if value is None or isinstance(value, str | int | float):
        return None if isinstance(value, float) and not math.isfinite(value) else value
    return _finite(_plain(value))


def dumps(value: Any) -> str:
    """JSON that jsonb accepts, whatever numbers the model handed us."""
    try:
        return json.dumps(value, default=_plain, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError):
        return json.dumps(_finite(value), allow_nan=False, separators=(",", ":"))


def _json_object(parts: Sequence[tuple[str, pa.Array]]) -> pa.Array:
    """Per row, a JSON object text {key: value_text, ...} built column-wise."""
    pieces: list[Any] = []
    for i, (key, values) in enumerate(parts):
        pieces += [("{" if i == 0 else ",") + dumps(key) + ":", values]
    pieces.append("}")
    return pc.binary_join_element_wise(*pieces, "")


def _json_numbers(values: np.ndarray) -> pa.Array:
    """Numbers as JSON text; NaN and infinity as null, as `dumps` writes them."""
    arr = pa.array(values, mask=~np.isfinite(values))
    return pc.fill_null(pc.cast(arr, pa.string()), "null")


def _json_texts(values: np.ndarray, missing: str) -> pa.Array:
    """Texts as `dumps` writes them (each distinct one encoded once); `missing` as null."""
    coded = pc.dictionary_encode(pa.array(values, pa.string()))
    distinct = coded.dictionary.to_pylist()
    texts = pa.array([None if v == missing else dumps(v) for v in distinct], pa.string())
    return pc.fill_null(texts.take(coded.indices), "null")


# -- spill lines -----------------------------------------------------------------------------


def to_line(item: Item) -> bytes:
    """One spill line; `kind` lets predictions and labels share a file."""
    doc: dict[str, Any]
    if isinstance(item, Prediction):
        doc = {
            "kind": "prediction",
            "request_id": item.request_id,
            "ts": item.ts.isoformat(),
            "model_name": item.model_name,
            "model_version": item.model_version,
            "inputs": item.inputs,
            "predicted": item.predicted,
            "probabilities": item.probabilities,
            "latency_ms": item.latency_ms,
        }
    else:
        doc = {
            "kind": "feedback",
            "request_id": item.request_id,
            "label": item.label,
            "ts": item.ts.isoformat(),
        }
    return dumps(doc).encode() + b"\n"


def from_line(line: bytes | str) -> Item:
    """Parse a spill line; ValueError if it is not one (e.g. cut short by a crash)."""
    try:
        doc = json.loads(line)
        kind = doc.pop("kind")
        doc["ts"] = datetime.fromisoformat(doc["ts"])
        if kind == "prediction":
            return Prediction(**doc)
        if kind == "feedback":
            return Feedback(**doc)
    except (TypeError, KeyError, AttributeError, ValueError) as exc:
        raise ValueError(f"not a prediction log line: {exc}") from exc
    raise ValueError(f"not a prediction log line: unknown kind {kind!r}")


# -- live rows to PostgreSQL ---------------------------------------------------------------

_COLUMNS = ", ".join(LOG_COLUMNS)
# Staging tables for COPY, one set per connection, emptied at each commit.
_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS predlog_predictions_in
    (LIKE predictions INCLUDING DEFAULTS) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS predlog_feedback_in
    (LIKE feedback INCLUDING DEFAULTS) ON COMMIT DELETE ROWS
"""
_COPY_PREDICTIONS = f"COPY predlog_predictions_in ({_COLUMNS}) FROM STDIN"
_INSERT_PREDICTIONS = (
    f"INSERT INTO predictions ({_COLUMNS})"
    f" SELECT {_COLUMNS} FROM predlog_predictions_in"
    " ON CONFLICT (request_id) DO NOTHING"
)
_COPY_FEEDBACK = "COPY predlog_feedback_in (request_id, label, ts) FROM STDIN"
_UPSERT_FEEDBACK = """
INSERT INTO feedback AS f (request_id, label, ts)
SELECT request_id, label, ts FROM predlog_feedback_in
ON CONFLICT (request_id) DO UPDATE
SET label = EXCLUDED.label, ts = EXCLUDED.ts, received_at = now()
WHERE f.ts <= EXCLUDED.ts
"""


def create_staging(conn: psycopg.Connection[Any]) -> None:
    """Create the connection's staging tables that `write_items` COPYs into (once a connection)."""
    conn.execute(_STAGING)


def write_items(conn: psycopg.Connection[Any], items: Sequence[Item]) -> None:
    """Write `items` in one transaction; replaying them again changes nothing.

    A prediction is inserted unless logged already; a label replaces an earlier one only if
    its `ts` is not older. `conn` is in autocommit mode and has had `create_staging`.
    """
    predictions = [i for i in items if isinstance(i, Prediction)]
    # One upsert statement may not touch a row twice: keep each request's latest label.
    labels: dict[str, Feedback] = {}
    for item in items:
        if isinstance(item, Feedback):
            seen = labels.get(item.request_id)
            if seen is None or seen.ts <= item.ts:
                labels[item.request_id] = item
    with conn.transaction(), conn.cursor() as cur:
        if predictions:
            with cur.copy(_COPY_PREDICTIONS) as copy:
                for p in predictions:
                    copy.write_row(
                        (
                            p.request_id,
                            p.ts,
                            p.model_name,
                            p.model_version,
                            dumps(p.inputs),
                            p.predicted,
                            dumps(p.probabilities),
                            float(p.latency_ms),
                        )
                    )
            cur.execute(_INSERT_PREDICTIONS)
        if labels:
            with cur.copy(_COPY_FEEDBACK) as copy:
                for f in labels.values():
                    copy.write_row((f.request_id, f.label, f.ts))
            cur.execute(_UPSERT_FEEDBACK)


# -- batch rows ------------------------------------------------------------------------------


def _repeat(value: str, n: int) -> pa.Array:
    return pa.array([value], pa.string()).take(np.zeros(n, dtype=np.int32))


def log_rows(
    ids: pa.Array,
    columns: Mapping[str, np.ndarray],
    predicted: pa.Array,
    proba: np.ndarray,
    *,
    features: Sequence[tuple[str, str]],
    classes: Sequence[str],
    missing: str,
    model_name: str,
    model_version: str,
    batch_id: str,
    ts: datetime,
    latency_ms: float,
) -> pa.Table:
    """A batch's log rows (`BATCH_LOG_COLUMNS`) of scored rows: inputs and probabilities as JSON.

    `columns` holds each feature's values (`features`: name and kind, "numeric" or a text
    kind), a missing category spelled `missing`; `proba` one column per class of `classes`.
    """
    n = len(ids)
    inputs = _json_object(
        [
            (
                name,
                _json_numbers(columns[name])
                if kind == "numeric"
                else _json_texts(columns[name], missing),
            )
            for name, kind in features
        ]
    )
    probabilities = _json_object(
        [(c, _json_numbers(np.asarray(proba[:, j]))) for j, c in enumerate(classes)]
    )
    stamp = pa.scalar(ts.astimezone(UTC).replace(tzinfo=None), pa.timestamp("us"))
    return pa.table(
        {
            "request_id": ids,
            "ts": pa.array(np.full(n, stamp.value, dtype="datetime64[us]")).cast(
                pa.timestamp("us", tz="UTC")
            ),
            "model_name": _repeat(model_name, n),
            "model_version": _repeat(model_version, n),
            "inputs": inputs,
            "predicted": predicted,
            "probabilities": probabilities,
            "latency_ms": pa.array(np.full(n, latency_ms, dtype=np.float32)),
            "batch_id": _repeat(batch_id, n),
        }
    )
