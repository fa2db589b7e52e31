"""Batch inputs and outputs: Parquet/CSV files (local or `s3://`) and PostgreSQL tables.

`open_input` finds a source and reads its column names and a stamp of its content
(`default_batch_id` derives a batch id from it); `read_chunks` streams the columns a
batch needs, `chunk_rows` rows at a time, so memory stays flat. A table
(`table:[schema.]name`) is read with one COPY in a single snapshot. `publish` copies a
finished batch's files to a local or `s3://` directory. `read_file` and `read_query` read a
whole file, or what a SQL query returns in a read-only transaction (a tenant's training
data, snapshotted before its pipeline runs). Every failure a user can fix (a
missing file, an unknown table, an unreachable database) is a UserError naming it.
"""

from __future__ import annotations

import hashlib
import io
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias

import psycopg
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from psycopg import sql

from common.errors import UserError
from common.store.connection import connect

# CSV bytes read per block; about chunk_rows rows of a typical feature row.
_CSV_BYTES_PER_ROW = 160


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
    try:
        return connect(
            database_url,
            autocommit=False,
            statement_timeout=None,  # a big table takes as long as it takes
            connect_timeout=5,
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
    arrow = {c: _PG_ARROW.get(types[c], pa.string()) for c in columns}
    names = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    query = sql.SQL("COPY (SELECT {names} FROM {rel} ORDER BY {names}) TO STDOUT (FORMAT csv)")

    def parsed(buf: bytearray) -> Iterator[pa.RecordBatch]:
        yield from _parse_copy(buf, arrow).combine_chunks().to_batches(max_chunksize=chunk_rows)

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


def read_file(inp: FileInput) -> pa.Table:
    """The whole file; CSV columns typed as pandas would (numbers as numbers, not text)."""
    try:
        if inp.kind == "parquet":
            with inp.fs.open_input_file(inp.path) as f:
                return pq.read_table(f)
        with inp.fs.open_input_stream(inp.path) as f:
            return pacsv.read_csv(f)
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"{inp.source}: reading failed ({_first_line(exc)})") from exc


def read_query(query: str, database_url: str, variable: str) -> pa.Table:
    """What `query` returns, read in one READ ONLY transaction (one snapshot).

    The rows travel as one COPY; numbers and booleans come back as such, other types as
    text, as `table:` sources do. A failure (no connection, a bad query, a write) is a
    UserError naming `variable`, the environment variable holding the URL, never the URL.
    """
    query = query.strip().rstrip(";")
    try:
        conn = connect(
            database_url,
            autocommit=False,
            statement_timeout=None,
            connect_timeout=5,
            application_name="snapshot",
        )
    except psycopg.Error as exc:
        raise UserError(
            f"cannot connect to the database in {variable} ({_first_line(exc)})"
        ) from exc
    with conn:
        conn.read_only = True  # whatever the role may do, this transaction writes nothing
        try:
            with conn.cursor() as cur:
                cur.execute(sql.SQL("SELECT * FROM ({}) AS q LIMIT 0").format(sql.SQL(query)))
                described = [(c.name, c.type_code) for c in cur.description or []]
                names = {
                    oid: name
                    for oid, name in conn.execute(
                        "SELECT oid::int, typname FROM pg_type WHERE oid = ANY(%s)",
                        [[t for _, t in described]],
                    ).fetchall()
                }
                copy_sql = sql.SQL("COPY ({}) TO STDOUT (FORMAT csv)").format(sql.SQL(query))
                buf = bytearray()
                with cur.copy(copy_sql) as copy:
                    for row in copy:
                        buf += row
        except psycopg.Error as exc:
            raise UserError(f"the query failed ({_first_line(exc)})") from exc
    columns = [c for c, _ in described]
    if len(set(columns)) != len(columns):
        raise UserError(f"the query returns the same column name twice: {columns}")
    arrow = {c: _PG_ARROW.get(names.get(t, ""), pa.string()) for c, t in described}
    if not buf:
        return pa.schema(list(arrow.items())).empty_table()
    return _parse_copy(buf, arrow)


def _parse_copy(buf: bytearray, types: Mapping[str, pa.DataType]) -> pa.Table:
    """Rows of `COPY ... TO STDOUT (FORMAT csv)` in `types`' column order and types.

    NULL is an unquoted empty field, '' a quoted one; booleans come as t/f.
    """
    return pacsv.read_csv(
        io.BytesIO(buf),
        read_options=pacsv.ReadOptions(column_names=list(types)),
        parse_options=pacsv.ParseOptions(newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(
            column_types=dict(types),
            null_values=[""],
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
            true_values=["t"],
            false_values=["f"],
        ),
    )


def _sliced(batch: pa.RecordBatch, rows: int) -> Iterator[pa.RecordBatch]:
    for start in range(0, batch.num_rows, rows):
        yield batch.slice(start, rows)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def publish(paths: Sequence[Path], output: str, batch_id: str, s3: S3Options | None = None) -> str:
    """Copy a finished batch's files, in order, to `output/<batch_id>/`; that place as shown.

    `output` is a local directory or `s3://bucket/prefix`. Put the file readers wait for
    last: whoever sees it finds the others.
    """
    fs, base = _filesystem(output.rstrip("/"), s3)
    dest = f"{base}/{batch_id}"
    shown = f"{output.rstrip('/')}/{batch_id}"
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            fs.create_dir(dest, recursive=True)  # S3 needs no directory (markers would show)
        for path in paths:
            with path.open("rb") as src, fs.open_output_stream(f"{dest}/{path.name}") as out:
                shutil.copyfileobj(src, out, 8 << 20)
    except OSError as exc:
        raise UserError(f"{shown}: cannot write the batch's output: {_first_line(exc)}") from exc
    return shown
