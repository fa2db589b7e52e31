"""batch_score: score a whole file or table with one model version, in chunks, so memory stays flat.

The input is read chunk by chunk: a Parquet or CSV file (local or `s3://`) with pyarrow, a
PostgreSQL table or view (`table:[schema.]name`) with one streamed COPY. Each chunk is
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

import dataclasses
import hashlib
import io
import json
import re
import secrets
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol, TypeAlias

import mlflow.artifacts
import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from psycopg import sql

from common import registry
from common.errors import UserError
from common.settings import Settings
from models.data import MISSING_CATEGORY
from models.predict import Kind, Scorer

NAMESPACE = uuid.UUID("6f0c61d4-3b0e-5c39-9a53-2f7a3c1b8e42")
"""Namespace of batch request ids: uuid5(NAMESPACE, f"{batch_id}:{row_number}")."""

PREDICTIONS_FILE = "predictions.parquet"
REJECTS_FILE = "rejects.parquet"
# CSV bytes read per block; about chunk_rows rows of a typical feature row.
_CSV_BYTES_PER_ROW = 160
_NUMBER = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
# Where each of the 16 bytes' two hex digits go in the 36-character text form.
_HEX_POS = np.array([i + (i >= 8) + (i >= 12) + (i >= 16) + (i >= 20) for i in range(32)])


# -- input -------------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Options:
    """Where s3:// paths live: the endpoint and credentials, passed in explicitly."""

    endpoint_url: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    region: str = "us-east-1"


TABLE_PREFIX = "table:"
"""A source `table:[schema.]name` is a table or view in the database of DATABASE_URL."""

# PostgreSQL types read as numbers or booleans, like Parquet's; any other type as text.
_PG_ARROW: dict[str, pa.DataType] = {
    **dict.fromkeys(("int2", "int4", "int8"), pa.int64()),
    **dict.fromkeys(("float4", "float8", "numeric"), pa.float64()),
    "bool": pa.bool_(),
}
_PG_RELATIONS = ("r", "p", "v", "m", "f")  # tables, partitioned, views, materialized, foreign
_PG_RESOLVE = """
SELECT c.oid, n.nspname, c.relname, c.relkind
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = to_regclass(%s::text)
"""
_PG_COLUMNS = """
SELECT a.attname, coalesce(b.typname, t.typname)
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_type b ON b.oid = t.typbasetype AND t.typtype = 'd'
WHERE a.attrelid = %s::oid AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""
# Row count and an order-free hash of every row: the table's content stamp, one scan.
_PG_STAMP = "SELECT count(*), coalesce(sum(hashtextextended(t::text, 0)), 0)::text FROM {} AS t"


@dataclass(frozen=True)
class FileInput:
    """An opened file: its filesystem, path, format and a fingerprint of its content."""

    source: str
    fs: pafs.FileSystem
    path: str
    kind: Literal["parquet", "csv"]
    size: int
    mtime: str
    columns: tuple[str, ...]


@dataclass(frozen=True)
class TableInput:
    """An opened table or view: its columns and their types, and a fingerprint of its rows."""

    source: str
    database_url: str = field(repr=False)  # may carry a password
    schema: str
    name: str
    columns: tuple[str, ...]
    types: tuple[str, ...]  # PostgreSQL type names (a domain's base type), one per column
    rows: int
    digest: str


Input: TypeAlias = FileInput | TableInput
"""An opened batch source."""


def _filesystem(source: str, s3: S3Options | None) -> tuple[pafs.FileSystem, str]:
    if source.startswith("s3://"):
        opts = s3 or S3Options()
        kwargs: dict[str, Any] = {"region": opts.region}
        if opts.endpoint_url:
            scheme, _, host = opts.endpoint_url.partition("://")
            kwargs |= {"endpoint_override": host or scheme, "scheme": scheme if host else "https"}
        if opts.access_key and opts.secret_key:
            kwargs |= {"access_key": opts.access_key, "secret_key": opts.secret_key}
        return pafs.S3FileSystem(**kwargs), source.removeprefix("s3://")
    return pafs.LocalFileSystem(), str(Path(source).resolve())


def open_input(source: str, s3: S3Options | None = None, database_url: str | None = None) -> Input:
    """Find the source and read its column names; a missing or unreadable one is a UserError.

    `table:[schema.]name` is a table or view in the database at `database_url` (DATABASE_URL);
    anything else is a Parquet or CSV path, local or `s3://`.
    """
    if source.startswith(TABLE_PREFIX):
        return _open_table(source, database_url)
    fs, path = _filesystem(source, s3)
    suffix = Path(path).suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise UserError(f"{source}: unsupported file type '{suffix}'; use .parquet or .csv")
    try:
        info = fs.get_file_info(path)
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"{source}: cannot reach the file ({_first_line(exc)})") from exc
    if info.type != pafs.FileType.File:
        raise UserError(f"{source}: no such file")
    kind: Literal["parquet", "csv"] = "parquet" if suffix == ".parquet" else "csv"
    try:
        if kind == "parquet":
            with fs.open_input_file(path) as f:
                names = tuple(pq.ParquetFile(f).schema_arrow.names)
        else:
            with fs.open_input_stream(path) as f:
                names = tuple(pacsv.open_csv(f).schema.names)
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise UserError(f"{source}: not a readable {kind} file ({_first_line(exc)})") from exc
    mtime = info.mtime.isoformat() if info.mtime else ""
    return FileInput(source, fs, path, kind, int(info.size or 0), mtime, names)


def _pg_connect(source: str, database_url: str) -> psycopg.Connection[Any]:
    """A connection to read from; one that cannot be made is a UserError naming DATABASE_URL."""
    conninfo = re.sub(r"^postgres(?:ql)?(?:\+\w+)?://", "postgresql://", database_url)
    try:
        return psycopg.connect(
            conninfo,
            connect_timeout=5,
            client_encoding="utf8",
            keepalives=1,
            keepalives_idle=30,
            application_name="batch-score",
        )
    except psycopg.Error as exc:
        raise UserError(
            f"{source}: cannot connect to the database in DATABASE_URL ({_first_line(exc)})"
        ) from exc


def _open_table(source: str, database_url: str | None) -> TableInput:
    """Resolve the name as SQL does (search_path, case folding), read its columns and stamp."""
    name = source.removeprefix(TABLE_PREFIX).strip()
    if not name:
        raise UserError(f"{source}: no table name; use table:<name> or table:<schema>.<name>")
    if not database_url:
        raise UserError(
            f"{source}: a table is read from the database in DATABASE_URL, which is not set"
        )
    with _pg_connect(source, database_url) as conn:
        where = f"{conn.info.host}:{conn.info.port}/{conn.info.dbname}"
        try:
            found = conn.execute(_PG_RESOLVE, [name]).fetchone()
        except psycopg.Error as exc:
            raise UserError(f"{source}: not a table name ({_first_line(exc)})") from exc
        if found is None:
            folded = name != name.lower() and '"' not in name
            hint = '; unquoted names fold to lower case: quote them, "Name"' if folded else ""
            raise UserError(
                f"{source}: no table or view {name!r} in the database of DATABASE_URL "
                f"({where}){hint}"
            )
        oid, schema, relname, relkind = found
        if relkind not in _PG_RELATIONS:
            raise UserError(f"{source}: {schema}.{relname} is not a table or view")
        columns = conn.execute(_PG_COLUMNS, [oid]).fetchall()
        try:
            stamp = conn.execute(
                sql.SQL(_PG_STAMP).format(sql.Identifier(schema, relname))
            ).fetchone()
        except psycopg.Error as exc:
            raise UserError(
                f"{source}: cannot read {schema}.{relname} ({_first_line(exc)})"
            ) from exc
    rows, digest = stamp if stamp is not None else (0, "0")
    return TableInput(
        source,
        database_url,
        schema,
        relname,
        tuple(str(c) for c, _ in columns),
        tuple(str(t) for _, t in columns),
        int(rows),
        str(digest),
    )


def default_batch_id(inp: Input) -> str:
    """Same source, same content stamp, same id: a re-run on unchanged input is idempotent.

    A file's stamp is its size and modification time; a table's, its row count and a hash
    of its rows.
    """
    if isinstance(inp, TableInput):
        stem, stamp = re.sub(r"[^\w.-]", "_", inp.name), f"{inp.rows}|{inp.digest}"
    else:
        stem, stamp = Path(inp.path).stem, f"{inp.size}|{inp.mtime}"
    digest = hashlib.sha1(f"{inp.source}|{stamp}".encode()).hexdigest()[:10]
    return f"{stem}-{digest}"


def check_columns(inp: Input, features: Sequence[tuple[str, Kind]]) -> None:
    """Refuse the whole batch, before anything is written, if a feature column is absent."""
    missing = [name for name, _ in features if name not in inp.columns]
    if missing:
        raise UserError(
            f"{inp.source}: missing column(s) {missing}; the model needs "
            f"{[name for name, _ in features]} (found {list(inp.columns)})"
        )


def read_chunks(inp: Input, columns: Sequence[str], chunk_rows: int) -> Iterator[pa.RecordBatch]:
    """The source's `columns`, at most `chunk_rows` rows at a time; CSV columns as text.

    A table's rows come ORDER BY `columns`, in the order given (put the id column first), so
    an unchanged table gives the same row numbers, hence request ids, on every run.
    """
    if isinstance(inp, TableInput):
        yield from _read_table(inp, columns, chunk_rows)
        return
    try:
        if inp.kind == "parquet":
            with inp.fs.open_input_file(inp.path) as f:
                for batch in pq.ParquetFile(f).iter_batches(
                    batch_size=chunk_rows, columns=list(columns)
                ):
                    yield from _sliced(batch, chunk_rows)
            return
        convert = pacsv.ConvertOptions(
            column_types=dict.fromkeys(inp.columns, pa.string()),
            include_columns=list(columns),
            strings_can_be_null=True,
        )
        read = pacsv.ReadOptions(block_size=max(1 << 16, chunk_rows * _CSV_BYTES_PER_ROW))
        with inp.fs.open_input_stream(inp.path) as f:
            for batch in pacsv.open_csv(f, read_options=read, convert_options=convert):
                yield from _sliced(batch, chunk_rows)
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"{inp.source}: reading failed ({_first_line(exc)})") from exc


def _read_table(
    inp: TableInput, columns: Sequence[str], chunk_rows: int
) -> Iterator[pa.RecordBatch]:
    """COPY the ordered rows out as CSV in one statement (one snapshot); parse chunk by chunk.

    COPY sends one row per message, so a chunk is exactly `chunk_rows` rows and only one
    chunk is held at a time. NULL is an unquoted empty field, '' a quoted one.
    """
    types = dict(zip(inp.columns, inp.types, strict=True))
    names = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    query = sql.SQL("COPY (SELECT {names} FROM {rel} ORDER BY {names}) TO STDOUT (FORMAT csv)")
    read = pacsv.ReadOptions(column_names=list(columns))
    parse = pacsv.ParseOptions(newlines_in_values=True)
    convert = pacsv.ConvertOptions(
        column_types={c: _PG_ARROW.get(types[c], pa.string()) for c in columns},
        null_values=[""],
        strings_can_be_null=True,
        quoted_strings_can_be_null=False,
        true_values=["t"],
        false_values=["f"],
    )

    def parsed(buf: bytearray) -> Iterator[pa.RecordBatch]:
        table = pacsv.read_csv(
            io.BytesIO(buf), read_options=read, parse_options=parse, convert_options=convert
        )
        yield from table.combine_chunks().to_batches(max_chunksize=chunk_rows)

    try:
        with (
            _pg_connect(inp.source, inp.database_url) as conn,
            conn.cursor() as cur,
            cur.copy(query.format(names=names, rel=sql.Identifier(inp.schema, inp.name))) as copy,
        ):
            buf, n = bytearray(), 0
            for row in copy:
                buf += row
                n += 1
                if n == chunk_rows:
                    yield from parsed(buf)
                    buf, n = bytearray(), 0
            if n:
                yield from parsed(buf)
    except (psycopg.Error, pa.ArrowException) as exc:
        raise UserError(f"{inp.source}: reading failed ({_first_line(exc)})") from exc


def _sliced(batch: pa.RecordBatch, rows: int) -> Iterator[pa.RecordBatch]:
    for start in range(0, batch.num_rows, rows):
        yield batch.slice(start, rows)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
"""Columns of the rows handed to a LogSink, as the `predictions` table names them."""


class LogSink(Protocol):
    """Where a batch's prediction-log rows go; nothing is visible before `commit`."""

    def write(self, rows: pa.Table) -> None: ...

    def commit(self) -> int: ...


def _json_object(parts: Sequence[tuple[str, pa.Array]]) -> pa.Array:
    """Per row, a JSON object text {key: value_text, ...} built column-wise."""
    pieces: list[Any] = []
    for i, (key, values) in enumerate(parts):
        pieces += [("{" if i == 0 else ",") + json.dumps(key) + ":", values]
    pieces.append("}")
    return pc.binary_join_element_wise(*pieces, "")


def _json_numbers(values: np.ndarray) -> pa.Array:
    arr = pa.array(values, mask=~np.isfinite(values))
    return pc.fill_null(pc.cast(arr, pa.string()), "null")


def _json_texts(values: np.ndarray) -> pa.Array:
    arr = pa.array(values, pa.string())
    escaped = pc.replace_substring(pc.replace_substring(arr, "\\", "\\\\"), '"', '\\"')
    quoted = pc.binary_join_element_wise('"', escaped, '"', "")
    return pc.if_else(pc.equal(arr, MISSING_CATEGORY), "null", quoted)


def log_rows(
    ids: pa.Array,
    columns: Mapping[str, np.ndarray],
    predicted: pa.Array,
    proba: np.ndarray,
    scorer: Scorer,
    *,
    model_name: str,
    model_version: str,
    batch_id: str,
    ts: datetime,
    latency_ms: float,
) -> pa.Table:
    """Prediction-log rows of scored rows: inputs and probabilities as JSON text."""
    n = len(ids)
    inputs = _json_object(
        [
            (name, (_json_numbers if kind == "numeric" else _json_texts)(columns[name]))
            for name, kind in scorer.features
        ]
    )
    probabilities = _json_object(
        [(c, pc.cast(pa.array(proba[:, j]), pa.string())) for j, c in enumerate(scorer.classes)]
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


def publish(result: BatchResult, output: str, s3: S3Options | None = None) -> BatchResult:
    """Copy a finished batch's files to `output/<batch_id>/` (e.g. `s3://bucket/scored`).

    Rejects first, predictions last: a reader waiting for predictions.parquet finds both.
    """
    fs, base = _filesystem(output.rstrip("/"), s3)
    dest = f"{base}/{result.batch_id}"
    shown = f"{output.rstrip('/')}/{result.batch_id}"
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            fs.create_dir(dest, recursive=True)  # S3 needs no directory (markers would show)
        for path in (result.rejects_path, result.predictions_path):
            with path.open("rb") as src, fs.open_output_stream(f"{dest}/{path.name}") as out:
                shutil.copyfileobj(src, out, 8 << 20)
    except OSError as exc:
        raise UserError(f"{shown}: cannot write the batch's output: {_first_line(exc)}") from exc
    return dataclasses.replace(result, published=shown)


def proba_column(cls: str) -> str:
    return f"proba_{cls}"


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
            job.scorer,
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
    inp: Input,
    scorer: Scorer,
    *,
    model_name: str,
    model_version: str,
    batch_id: str,
    output_dir: Path,
    chunk_rows: int,
    keep: Sequence[str] = (),
    sink: LogSink | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> BatchResult:
    """Score every row of `inp`; write predictions and rejects Parquet, and log via `sink`.

    Refuses the batch (UserError) before writing if a feature column is missing. Files
    appear under `output_dir/batch_id/` only once everything, the log included, succeeded.
    """
    started = time.perf_counter()
    check_columns(inp, scorer.features)
    names = [name for name, _ in scorer.features]
    keep = [c for c in dict.fromkeys(keep) if c in inp.columns and c not in names]
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
        for batch in read_chunks(inp, [*keep, *names], chunk_rows):  # id first: table order
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
        source=inp.source,
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


# -- the model ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """A registry version downloaded to a local directory, ready for `Scorer.load`."""

    name: str
    version: str
    path: Path
    prefer_onnx: bool

    def load(self) -> Scorer:
        scorer = Scorer.load(self.path, prefer_onnx=self.prefer_onnx)
        scorer.self_check()
        return scorer


def fetch_model(settings: Settings, cache_dir: Path, alias: str | None = None) -> ModelRef:
    """Download `models:/<name>@<alias>` (champion by default) once into `cache_dir`.

    An unreachable MLflow server or a missing alias is a UserError naming what to fix.
    """
    name, alias = settings.model_name, alias or settings.model_alias
    client = registry.connect(settings)
    mv = registry.version_by_alias(client, name, alias)
    if mv is None:
        raise UserError(
            f"models:/{name}@{alias} does not exist at MLFLOW_TRACKING_URI="
            f"{settings.tracking_uri}; train and register a model first (make demo)."
        )
    version = str(mv.version)
    target = cache_dir / name / version
    if not (target / "MLmodel").exists():
        tmp = cache_dir / name / f".{version}.{secrets.token_hex(4)}.tmp"
        tmp.mkdir(parents=True)
        try:
            mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(tmp))
            tmp.rename(target)
        except OSError:
            if not (target / "MLmodel").exists():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return ModelRef(name, version, target, dict(mv.tags).get("onnx.parity") == "passed")
