"""batch_score: score a whole file or table with one model version, in chunks, so memory stays flat.

The input comes chunk by chunk (common.store.sources reads files and tables;
common.batch_job wires source -> chunks -> `score_batch` -> prediction-log sink). Each chunk is
checked column-wise: a row with a non-numeric text in a numeric column, an infinite
number or a category the model never saw goes to the rejects file with a `reason`; missing
values are allowed, as in serving. Good rows are scored straight from their columns
(`Scorer.proba_columns`), never through per-row dicts.

Nothing is half-written: both Parquet files grow under temporary names and are renamed only
after the prediction log (if any) has committed the whole batch in one transaction.
Request ids are uuid5(NAMESPACE, f"{batch_id}:{row_number}"), so a re-run of the same
batch id rewrites the same files and adds no rows to the log.
"""

from __future__ import annotations

import hashlib
import secrets
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common.errors import UserError
from common.store.rows import log_rows
from models.data import MISSING_CATEGORY, proba_column
from models.predict import Kind, Scorer

NAMESPACE = uuid.UUID("6f0c61d4-3b0e-5c39-9a53-2f7a3c1b8e42")
"""Namespace of batch request ids: uuid5(NAMESPACE, f"{batch_id}:{row_number}")."""

PREDICTIONS_FILE = "predictions.parquet"
REJECTS_FILE = "rejects.parquet"
_NUMBER = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
# Where each of the 16 bytes' two hex digits go in the 36-character text form.
_HEX_POS = np.array([i + (i >= 8) + (i >= 12) + (i >= 16) + (i >= 20) for i in range(32)])


# -- the input's columns -----------------------------------------------------------------


def check_columns(
    source: str, columns: Sequence[str], features: Sequence[tuple[str, Kind]]
) -> None:
    """Refuse the whole batch, before anything is written, if a feature column is absent."""
    missing = [name for name, _ in features if name not in columns]
    if missing:
        raise UserError(
            f"{source}: missing column(s) {missing}; the model needs "
            f"{[name for name, _ in features]} (found {list(columns)})"
        )


def columns_to_read(
    source: str,
    columns: Sequence[str],
    features: Sequence[tuple[str, Kind]],
    keep: Sequence[str] = (),
) -> list[str]:
    """The columns a batch reads of an input with `columns`: the kept ones, then the features.

    Kept columns (the id) come first, so a table read ORDER BY them numbers its rows the
    same way on every run; a kept column the input lacks is left out. UserError if a
    feature column is missing.
    """
    check_columns(source, columns, features)
    names = [name for name, _ in features]
    kept = [c for c in dict.fromkeys(keep) if c in columns and c not in names]
    return [*kept, *names]


# -- one chunk ---------------------------------------------------------------------------


@dataclass
class Checked:
    """A chunk's model inputs (all rows) and which rows are bad, with why."""

    columns: dict[str, np.ndarray]
    bad: np.ndarray
    raw: pa.RecordBatch
    reasons: list[str] = field(default_factory=list)  # one per bad row, in row order


def check_chunk(
    batch: pa.RecordBatch,
    features: Sequence[tuple[str, Kind]],
    categories: Mapping[str, Sequence[str]],
    bounds: Mapping[str, tuple[float | None, float | None]] | None = None,
) -> Checked:
    """Turn a chunk into model columns; mark rows that break the contract, vectorised.

    `bounds` are the (min, max) the model's data contract declares (Schema.bounds).
    """
    n = batch.num_rows
    columns: dict[str, np.ndarray] = {}
    rules: list[tuple[np.ndarray, str, pa.Array | None]] = []
    for name, kind in features:
        arr = batch.column(name)
        if kind == "numeric":
            values, not_number = _numbers(arr)
            if not_number is not None:
                rules.append((not_number, f"{name}: not a number", arr))
            infinite = np.isinf(values)
            if infinite.any():
                rules.append((infinite, f"{name}: not finite", None))
            low, high = (bounds or {}).get(name, (None, None))
            outside = ~infinite & (
                (values < low if low is not None else False)
                | (values > high if high is not None else False)
            )
            if np.any(outside):
                span = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
                rules.append((outside, f"{name}: outside the trained range {span}", arr))
            columns[name] = values
        else:
            text, missing = _texts(arr)
            known = pa.array(list(categories.get(name, ())), pa.string())
            unknown = ~missing & ~pc.is_in(text, value_set=known).to_numpy(zero_copy_only=False)
            if unknown.any():
                rules.append((unknown, f"{name}: unknown category", text))
            filled = pc.if_else(pa.array(missing), MISSING_CATEGORY, text)
            columns[name] = filled.to_numpy(zero_copy_only=False)
    bad = np.zeros(n, dtype=bool)
    for mask, _, _ in rules:
        bad |= mask
    reasons: list[str] = []
    if bad.any():
        per_row: dict[int, list[str]] = {}
        for mask, rule, shown in rules:
            for i in np.flatnonzero(mask).tolist():
                text = rule if shown is None else f"{rule} {shown[i].as_py()!r}"
                per_row.setdefault(i, []).append(text)
        reasons = ["; ".join(per_row[i]) for i in np.flatnonzero(bad).tolist()]
    return Checked(columns, bad, batch, reasons)


def _numbers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray | None]:
    """float64 with NaN for missing, and a mask of text that is not a number (or None)."""
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        stripped = pc.utf8_trim_whitespace(arr)
        empty = pc.fill_null(pc.equal(stripped, ""), True)
        number = pc.fill_null(pc.match_substring_regex(stripped, _NUMBER), False)
        garbage = pc.and_(pc.invert(empty), pc.invert(number))
        parsed = pc.cast(pc.if_else(number, stripped, None), pa.float64())
        values = parsed.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
        mask = garbage.to_numpy(zero_copy_only=False)
        return values, mask if mask.any() else None
    if (
        pa.types.is_integer(arr.type)
        or pa.types.is_floating(arr.type)
        or pa.types.is_boolean(arr.type)
        or pa.types.is_decimal(arr.type)
        or pa.types.is_null(arr.type)
    ):
        values = pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False)
        return np.asarray(values, dtype=np.float64), None
    raise UserError(f"a numeric feature has column type {arr.type}; expected numbers or text")


def _texts(arr: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """The column as text, and where it is missing (null or empty), like model_frame."""
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    text = arr if pa.types.is_string(arr.type) else pc.cast(arr, pa.string())
    if isinstance(text, pa.ChunkedArray):
        text = text.combine_chunks()
    missing = pc.fill_null(pc.equal(text, ""), True).to_numpy(zero_copy_only=False)
    return text, np.asarray(missing, dtype=bool)


def request_ids(batch_id: str, start: int, count: int) -> pa.Array:
    """uuid5(NAMESPACE, f"{batch_id}:{row}") for rows start..start+count-1, as text."""
    base = hashlib.sha1(NAMESPACE.bytes + f"{batch_id}:".encode())
    digests = bytearray()
    for row in range(start, start + count):
        h = base.copy()
        h.update(b"%d" % row)
        digests += h.digest()[:16]
    raw = np.frombuffer(bytes(digests), dtype=np.uint8).reshape(count, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x50  # version 5
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    text = np.full((count, 36), ord("-"), dtype=np.uint8)
    nibbles = np.empty((count, 32), dtype=np.uint8)
    nibbles[:, 0::2] = raw >> 4
    nibbles[:, 1::2] = raw & 0x0F
    text[:, _HEX_POS] = _HEX[nibbles]
    fixed = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(36), count, [None, pa.py_buffer(text.tobytes())]
    )
    return pc.cast(pc.cast(fixed, pa.binary()), pa.string())


# -- the log rows ------------------------------------------------------------------------


class LogSink(Protocol):
    """Where a batch's prediction-log rows go; nothing is visible before `commit`.

    Each `write` gets one chunk's rows as `common.store.rows.log_rows` shapes them
    (`BATCH_LOG_COLUMNS`); `common.store.BatchLogWriter` is the one for PostgreSQL.
    """

    def write(self, rows: pa.Table) -> None: ...

    def commit(self) -> int: ...


# -- the batch ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchResult:
    """What a batch run wrote, for the run's summary."""

    batch_id: str
    source: str
    model_name: str
    model_version: str
    backend: str
    rows: int
    scored: int
    rejected: int
    predictions_path: Path
    rejects_path: Path
    logged: int | None  # rows new to the prediction log; None without a log
    seconds: float
    published: str | None = None  # where `publish` copied the two files (`s3://.../<batch_id>`)

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    @property
    def files(self) -> tuple[Path, Path]:
        """Rejects first, predictions last: the order to publish them in, so that a reader
        waiting for predictions.parquet finds both."""
        return self.rejects_path, self.predictions_path


@dataclass(frozen=True)
class _Job:
    """What every chunk of one batch shares."""

    scorer: Scorer
    model_name: str
    model_version: str
    batch_id: str
    keep: Sequence[str]
    read: Sequence[str]
    log: bool
    pool: ThreadPoolExecutor  # onnxruntime releases the GIL: score while ids are hashed


@dataclass(frozen=True)
class _Chunk:
    predictions: pa.Table
    rejects: pa.Table
    log: pa.Table | None


def _score_chunk(job: _Job, batch: pa.RecordBatch, start: int) -> _Chunk:
    """Check, score and shape one chunk whose first row is row number `start`."""
    t0 = time.perf_counter()
    n = batch.num_rows
    features, classes = job.scorer.features, job.scorer.classes
    checked = check_chunk(batch, features, job.scorer.categories, job.scorer.schema.bounds)
    row_numbers = np.arange(start, start + n, dtype=np.int64)
    good = ~checked.bad
    cols = checked.columns
    if checked.bad.any():
        cols = {k: v[good] for k, v in cols.items()}
        row_numbers = row_numbers[good]
    m = len(row_numbers)
    scoring = job.pool.submit(job.scorer.proba_columns, cols) if m else None
    ids = request_ids(job.batch_id, start, n)
    if checked.bad.any():
        keep_rows = pa.array(good)
        ids, batch = ids.filter(keep_rows), batch.filter(keep_rows)
    proba = scoring.result() if scoring is not None else np.empty((0, len(classes)))
    labels = np.asarray(classes, dtype=object)[proba.argmax(axis=1)]
    predicted = pa.array(labels, pa.string())
    out: dict[str, Any] = {
        "row_number": pa.array(row_numbers),
        "request_id": ids,
        "batch_id": _repeat(job.batch_id, m),
        **{c: batch.column(c) for c in job.keep},
        "model_name": _repeat(job.model_name, m),
        "model_version": _repeat(job.model_version, m),
        "predicted": predicted,
        **{proba_column(c): pa.array(proba[:, j]) for j, c in enumerate(classes)},
    }
    rejects = _rejects(checked, start, job.read) if checked.bad.any() else None
    log = None
    if job.log and m:
        log = log_rows(
            ids,
            cols,
            predicted,
            proba,
            features=features,
            classes=classes,
            missing=MISSING_CATEGORY,
            model_name=job.model_name,
            model_version=job.model_version,
            batch_id=job.batch_id,
            ts=datetime.now(UTC),
            latency_ms=(time.perf_counter() - t0) * 1000 / n,
        )
    return _Chunk(pa.table(out), rejects or _rejects_schema(job.read).empty_table(), log)


def _repeat(value: str, n: int) -> pa.Array:
    return pa.array([value], pa.string()).take(np.zeros(n, dtype=np.int32))


def score_batch(
    chunks: Iterable[pa.RecordBatch],
    scorer: Scorer,
    *,
    source: str,
    columns: Sequence[str],
    model_name: str,
    model_version: str,
    batch_id: str,
    output_dir: Path,
    keep: Sequence[str] = (),
    sink: LogSink | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> BatchResult:
    """Score every row of `chunks`; write predictions and rejects Parquet, and log via `sink`.

    `chunks` are the rows of the input `source` (whose columns are `columns`), in order,
    with at least the columns `columns_to_read` names. Refuses the batch (UserError) before
    writing if a feature column is missing. Files appear under `output_dir/batch_id/` only
    once everything, the log included, succeeded.
    """
    started = time.perf_counter()
    names = [name for name, _ in scorer.features]
    read = columns_to_read(source, columns, scorer.features, keep)
    keep = read[: len(read) - len(names)]
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-score")
    job = _Job(
        scorer, model_name, model_version, batch_id, keep, [*names, *keep], sink is not None, pool
    )

    target = output_dir / batch_id
    target.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(4)
    tmp_pred = target / f".{PREDICTIONS_FILE}.{token}.tmp"
    tmp_rej = target / f".{REJECTS_FILE}.{token}.tmp"
    writers: list[pq.ParquetWriter] = []
    rows = rejected = 0
    try:
        for batch in chunks:
            chunk = _score_chunk(job, batch, rows)
            if not writers:
                writers = [
                    pq.ParquetWriter(tmp_pred, chunk.predictions.schema),
                    pq.ParquetWriter(tmp_rej, chunk.rejects.schema),
                ]
            writers[0].write_table(chunk.predictions)
            writers[1].write_table(chunk.rejects)
            if sink is not None and chunk.log is not None:
                sink.write(chunk.log)
            rows += batch.num_rows
            rejected += chunk.rejects.num_rows
            if progress is not None:
                progress(rows, rejected)
        if not writers:  # no rows at all: still leave well-formed, empty files
            writers = [
                pq.ParquetWriter(tmp_pred, _empty_predictions(scorer.classes, keep)),
                pq.ParquetWriter(tmp_rej, _rejects_schema(job.read)),
            ]
        for writer in writers:
            writer.close()
        logged = sink.commit() if sink is not None else None
        tmp_pred.replace(target / PREDICTIONS_FILE)
        tmp_rej.replace(target / REJECTS_FILE)
    except BaseException:
        for writer in writers:
            if writer.is_open:
                writer.close()
        tmp_pred.unlink(missing_ok=True)
        tmp_rej.unlink(missing_ok=True)
        if not any(target.iterdir()):
            shutil.rmtree(target, ignore_errors=True)
        raise
    finally:
        pool.shutdown(wait=True)
    return BatchResult(
        batch_id=batch_id,
        source=source,
        model_name=model_name,
        model_version=model_version,
        backend=scorer.backend,
        rows=rows,
        scored=rows - rejected,
        rejected=rejected,
        predictions_path=target / PREDICTIONS_FILE,
        rejects_path=target / REJECTS_FILE,
        logged=logged,
        seconds=time.perf_counter() - started,
    )


def _rejects_schema(read: Sequence[str]) -> pa.Schema:
    return pa.schema(
        [("row_number", pa.int64()), *((c, pa.string()) for c in read), ("reason", pa.string())]
    )


def _rejects(checked: Checked, start: int, read: Sequence[str]) -> pa.Table:
    """The bad rows as they came (every column as text), their row number and reason."""
    mask = pa.array(checked.bad)
    cols: list[pa.Array] = [pa.array(np.flatnonzero(checked.bad).astype(np.int64) + start)]
    cols += [pc.cast(checked.raw.column(c).filter(mask), pa.string()) for c in read]
    cols.append(pa.array(checked.reasons, pa.string()))
    return pa.Table.from_arrays(cols, schema=_rejects_schema(read))


def _empty_predictions(classes: Sequence[str], keep: Sequence[str]) -> pa.Schema:
    fields: list[tuple[str, pa.DataType]] = [
        ("row_number", pa.int64()),
        ("request_id", pa.string()),
        ("batch_id", pa.string()),
        *((c, pa.string()) for c in keep),
        ("model_name", pa.string()),
        ("model_version", pa.string()),
        ("predicted", pa.string()),
        *((proba_column(c), pa.float64()) for c in classes),
    ]
    return pa.schema(fields)
