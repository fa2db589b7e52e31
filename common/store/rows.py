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

from common.store.tenants import DEFAULT_TENANT, scope

if TYPE_CHECKING:
    import psycopg

LOG_COLUMNS = (
    "tenant_id",
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

LIVE_LOG_COLUMNS = (*LOG_COLUMNS, "variant")
"""Columns of a live prediction (`Prediction`): a prediction's, and the variant that made it."""

VARIANTS = ("champion", "challenger", "shadow")
"""The variants of a served model (registry aliases); a batch row is always the champion's."""


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
    tenant_id: str
    variant: str = "champion"
    """Which alias answered (VARIANTS); a shadow's rows are logged, never returned."""

    def __post_init__(self) -> None:
        _check_row(self.request_id, self.ts)
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")


@dataclass(frozen=True)
class Feedback:
    """The true label of an earlier request of `tenant_id`; a later one (by `ts`) replaces it.

    `source` says where it came from (`key:<key_id>` for a label sent through the API).
    """

    request_id: str
    label: str
    ts: datetime
    tenant_id: str
    source: str | None = None

    def __post_init__(self) -> None:
        _check_row(self.request_id, self.ts)


@dataclass(frozen=True)
class ServingError:
    """A request a variant failed to score (its exception, cut short); one row of
    `serving_errors`. A challenger's: the champion answered instead."""

    error_id: str
    ts: datetime
    tenant_id: str
    model_name: str
    model_version: str
    variant: str
    error: str

    def __post_init__(self) -> None:
        _check_row(self.error_id, self.ts)
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")

    @classmethod
    def of(
        cls,
        exc: BaseException,
        *,
        tenant_id: str,
        model_name: str,
        model_version: str,
        variant: str,
        ts: datetime,
    ) -> ServingError:
        """The row of `exc`, raised by `variant` (model name and version) on `tenant_id`'s
        request, with a fresh error id."""
        said = f"{type(exc).__name__}: {exc}".replace("\x00", "")[:ERROR_CHARS]
        return cls(str(uuid.uuid4()), ts, tenant_id, model_name, model_version, variant, said)


ERROR_CHARS = 2000
"""A serving error's text is cut to this many characters."""

Item: TypeAlias = Prediction | Feedback | ServingError


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
            "tenant_id": item.tenant_id,
            "variant": item.variant,
        }
    elif isinstance(item, ServingError):
        doc = {
            "kind": "serving_error",
            "error_id": item.error_id,
            "ts": item.ts.isoformat(),
            "tenant_id": item.tenant_id,
            "model_name": item.model_name,
            "model_version": item.model_version,
            "variant": item.variant,
            "error": item.error,
        }
    else:
        doc = {
            "kind": "feedback",
            "request_id": item.request_id,
            "label": item.label,
            "ts": item.ts.isoformat(),
            "tenant_id": item.tenant_id,
            "source": item.source,
        }
    return dumps(doc).encode() + b"\n"


def from_line(line: bytes | str) -> Item:
    """Parse a spill line; ValueError if it is not one (e.g. cut short by a crash)."""
    try:
        doc = json.loads(line)
        kind = doc.pop("kind")
        doc["ts"] = datetime.fromisoformat(doc["ts"])
        doc.setdefault("tenant_id", DEFAULT_TENANT)  # spilled before tenants existed
        if kind == "prediction":
            return Prediction(**doc)
        if kind == "feedback":
            return Feedback(**doc)
        if kind == "serving_error":
            return ServingError(**doc)
    except (TypeError, KeyError, AttributeError, ValueError) as exc:
        raise ValueError(f"not a prediction log line: {exc}") from exc
    raise ValueError(f"not a prediction log line: unknown kind {kind!r}")


# -- live rows to PostgreSQL ---------------------------------------------------------------

_COLUMNS = ", ".join(LIVE_LOG_COLUMNS)
# Staging tables for COPY, one set per connection, emptied at each commit.
_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS predlog_predictions_in
    (LIKE predictions INCLUDING DEFAULTS) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS predlog_feedback_in
    (LIKE feedback INCLUDING DEFAULTS) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS predlog_errors_in
    (LIKE serving_errors INCLUDING DEFAULTS) ON COMMIT DELETE ROWS
"""
_COPY_PREDICTIONS = f"COPY predlog_predictions_in ({_COLUMNS}) FROM STDIN"
# Row-level security checks each row against the transaction's tenant: one INSERT a tenant.
_INSERT_PREDICTIONS = (
    f"INSERT INTO predictions ({_COLUMNS})"
    f" SELECT {_COLUMNS} FROM predlog_predictions_in WHERE tenant_id = %s"
    " ON CONFLICT (request_id) DO NOTHING"
)
_COPY_FEEDBACK = "COPY predlog_feedback_in (tenant_id, request_id, label, ts, source) FROM STDIN"
_UPSERT_FEEDBACK = """
INSERT INTO feedback AS f (tenant_id, request_id, label, ts, source)
SELECT tenant_id, request_id, label, ts, source FROM predlog_feedback_in WHERE tenant_id = %s
ON CONFLICT (tenant_id, request_id) DO UPDATE
SET label = EXCLUDED.label, ts = EXCLUDED.ts, source = EXCLUDED.source, received_at = now()
WHERE f.ts <= EXCLUDED.ts
"""


_ERROR_COLUMNS = "error_id, tenant_id, ts, model_name, model_version, variant, error"
_COPY_ERRORS = f"COPY predlog_errors_in ({_ERROR_COLUMNS}) FROM STDIN"
_INSERT_ERRORS = (
    f"INSERT INTO serving_errors ({_ERROR_COLUMNS})"
    f" SELECT {_ERROR_COLUMNS} FROM predlog_errors_in WHERE tenant_id = %s"
    " ON CONFLICT (error_id) DO NOTHING"
)


def create_staging(conn: psycopg.Connection[Any]) -> None:
    """Create the connection's staging tables that `write_items` COPYs into (once a connection)."""
    conn.execute(_STAGING)


def _latest_labels(items: Sequence[Item]) -> dict[tuple[str, str], Feedback]:
    """Each (tenant, request)'s latest label: one upsert may not touch a row twice."""
    labels: dict[tuple[str, str], Feedback] = {}
    for item in items:
        if isinstance(item, Feedback):
            seen = labels.get((item.tenant_id, item.request_id))
            if seen is None or seen.ts <= item.ts:
                labels[(item.tenant_id, item.request_id)] = item
    return labels


def _copy_errors(cur: psycopg.Cursor[Any], errors: Sequence[ServingError]) -> None:
    with cur.copy(_COPY_ERRORS) as copy:
        for e in errors:
            row = (e.error_id, e.tenant_id, e.ts, e.model_name, e.model_version, e.variant, e.error)
            copy.write_row(row)


def write_items(conn: psycopg.Connection[Any], items: Sequence[Item]) -> None:
    """Write `items` in one transaction; replaying them again changes nothing.

    A prediction (a serving error) is inserted unless logged already; a label replaces an
    earlier one only if its `ts` is not older. Each tenant's rows are inserted under that
    tenant's scope, so row-level security checks every row. `conn` is in autocommit mode and has had
    `create_staging`.
    """
    predictions = [i for i in items if isinstance(i, Prediction)]
    errors = [i for i in items if isinstance(i, ServingError)]
    labels = _latest_labels(items)
    tenants = sorted(
        {i.tenant_id for i in predictions} | {i.tenant_id for i in errors} | {t for t, _ in labels}
    )
    with conn.transaction(), conn.cursor() as cur:
        if predictions:
            with cur.copy(_COPY_PREDICTIONS) as copy:
                for p in predictions:
                    copy.write_row(
                        (
                            p.tenant_id,
                            p.request_id,
                            p.ts,
                            p.model_name,
                            p.model_version,
                            dumps(p.inputs),
                            p.predicted,
                            dumps(p.probabilities),
                            float(p.latency_ms),
                            p.variant,
                        )
                    )
        if labels:
            with cur.copy(_COPY_FEEDBACK) as copy:
                for f in labels.values():
                    copy.write_row((f.tenant_id, f.request_id, f.label, f.ts, f.source))
        if errors:
            _copy_errors(cur, errors)
        for tenant in tenants:
            scope(conn, tenant)
            if predictions:
                cur.execute(_INSERT_PREDICTIONS, [tenant])
            if errors:
                cur.execute(_INSERT_ERRORS, [tenant])
            if labels:
                cur.execute(_UPSERT_FEEDBACK, [tenant])


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
    tenant_id: str = DEFAULT_TENANT,
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
            "tenant_id": _repeat(tenant_id, n),
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
