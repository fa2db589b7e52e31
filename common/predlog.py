"""The prediction log: every prediction and late label, written to PostgreSQL off the request path.

The service calls `PredictionLog.submit()`, which only appends to a bounded in-memory
buffer; one writer thread writes batches (COPY into a temp table, then INSERT ... ON
CONFLICT). While PostgreSQL is away, rows go to spill files (JSON lines under `spill_dir`)
and are written back, oldest first, once it answers again. Delivery is at least once and
every write is idempotent (a prediction is inserted ON CONFLICT DO NOTHING; a label
replaces an earlier one only if its `ts` is not older), so a replay after a partial
failure never duplicates: each prediction ends up logged exactly once.

Spill files are named `predlog-<pid>-<token>-<seq>.jsonl` and held with `flock` by the
process writing them. Any writer adopts and replays `*.jsonl` files in `spill_dir` that no
live process holds, so rows spilled by a worker that exited or crashed are not lost.
`flock` needs `spill_dir` on a local disk. The writer applies pending migrations when it
first connects, so a service that started while PostgreSQL was down still gets its tables.

Known limits, by design:
- The spill is bounded (`max_spill` rows, in ten segments). Past it the oldest segment is
  deleted and its rows are counted in `dropped`; so is a row that could not be spilled
  (disk full).
- Rows PostgreSQL refuses as data (a value of the wrong type, a NUL in text) are set
  aside in `*.rejected` files and counted in `rejected`, so one bad row cannot block
  the rest.
- Spill files are not fsynced and rows still in memory die with a SIGKILLed process;
  `close()` (also run at interpreter exit) spills them. What `close()` cannot write
  within its timeout stays in the spill files for the next writer.
- Create and start the log in the process that uses it (after any fork).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import io
import json
import logging
import math
import os
import re
import secrets
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any, TypeAlias

import psycopg
import pyarrow as pa
import pyarrow.csv as pacsv

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_MIGRATION_FILE = re.compile(r"^\d{4}_[a-z0-9_]+\.sql$")
# pg_advisory_xact_lock key held while migrating; any constant no other code uses.
_MIGRATION_LOCK_KEY = 0x7072_6564_6C6F_67  # "predlog"
# Seconds; libpq honours nothing shorter.
CONNECT_TIMEOUT = 2
# How often a running writer looks for spill files left by processes that are gone.
ADOPT_INTERVAL = 10.0
SPILL_SUFFIX = ".jsonl"
# Spilled batches a writer cycle replays before it turns to the rows in memory.
REPLAY_BATCHES = 20


# -- rows ------------------------------------------------------------------------------


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


def _dumps(value: Any) -> str:
    """JSON that jsonb accepts, whatever numbers the model handed us."""
    try:
        return json.dumps(value, default=_plain, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError):
        return json.dumps(_finite(value), allow_nan=False, separators=(",", ":"))


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
    return _dumps(doc).encode() + b"\n"


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


# -- database --------------------------------------------------------------------------


def _conninfo(database_url: str) -> str:
    """libpq wants postgresql://; accept the SQLAlchemy spelling postgresql+psycopg:// too."""
    return re.sub(r"^postgres(?:ql)?(?:\+\w+)?://", "postgresql://", database_url)


def _connect(database_url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(
        _conninfo(database_url),
        autocommit=True,  # transactions are explicit: conn.transaction()
        connect_timeout=CONNECT_TIMEOUT,
        # A server that vanishes mid-call must fail the call, not hang the writer for minutes.
        keepalives=1,
        keepalives_idle=5,
        keepalives_interval=2,
        keepalives_count=2,
        tcp_user_timeout=10_000,
        options="-c statement_timeout=30000",
        application_name="predlog",
    )


def _migration_files() -> list[Path]:
    return sorted(p for p in MIGRATIONS_DIR.iterdir() if _MIGRATION_FILE.match(p.name))


def _apply_migrations(conn: psycopg.Connection[Any]) -> list[str]:
    """Apply pending migrations in one transaction; the advisory lock serialises workers."""
    applied: list[str] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", [_MIGRATION_LOCK_KEY])
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
        for path in _migration_files():
            if path.stem in done:
                continue
            conn.execute(path.read_bytes())
            conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", [path.stem])
            applied.append(path.stem)
    return applied


def migrate(database_url: str) -> list[str]:
    """Apply common/migrations/NNNN_*.sql not yet applied, in order; return their names.

    Safe when several workers start at once: the second waits for the first, then finds
    nothing to do.
    """
    with _connect(database_url) as conn:
        applied = _apply_migrations(conn)
    if applied:
        log.info("prediction log: applied migrations %s", ", ".join(applied))
    return applied


def prediction_exists(database_url: str, request_id: str) -> bool | None:
    """Whether `request_id` is logged; None when PostgreSQL cannot be reached.

    False may also mean the prediction is still buffered, so feedback should be accepted
    either way (the feedback table has no foreign key for this reason).
    """
    try:
        uuid.UUID(request_id)
    except ValueError:
        return False
    try:
        with _connect(database_url) as conn:
            row = conn.execute(
                "SELECT 1 FROM predictions WHERE request_id = %s", [request_id]
            ).fetchone()
    except psycopg.OperationalError:
        return None
    return row is not None


_PREDICTION_COLUMNS = (
    "request_id, ts, model_name, model_version, inputs, predicted, probabilities, latency_ms"
)
# Staging tables for COPY, one set per connection, emptied at each commit.
_TEMP_TABLES = """
CREATE TEMP TABLE IF NOT EXISTS predlog_predictions_in
    (LIKE predictions INCLUDING DEFAULTS) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS predlog_feedback_in
    (LIKE feedback INCLUDING DEFAULTS) ON COMMIT DELETE ROWS
"""
_COPY_PREDICTIONS = f"COPY predlog_predictions_in ({_PREDICTION_COLUMNS}) FROM STDIN"
_INSERT_PREDICTIONS = (
    f"INSERT INTO predictions ({_PREDICTION_COLUMNS})"
    f" SELECT {_PREDICTION_COLUMNS} FROM predlog_predictions_in"
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
_DATA_ERRORS = (psycopg.DataError, psycopg.IntegrityError)


def _write_batch(conn: psycopg.Connection[Any], items: Sequence[Item]) -> None:
    """Write `items` in one transaction; replaying them again changes nothing."""
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
                            _dumps(p.inputs),
                            p.predicted,
                            _dumps(p.probabilities),
                            float(p.latency_ms),
                        )
                    )
            cur.execute(_INSERT_PREDICTIONS)
        if labels:
            with cur.copy(_COPY_FEEDBACK) as copy:
                for f in labels.values():
                    copy.write_row((f.request_id, f.label, f.ts))
            cur.execute(_UPSERT_FEEDBACK)


# -- spill files -----------------------------------------------------------------------


@dataclass(eq=False)
class _Segment:
    """A spill file we hold `flock` on: `rows` lines, the first `done` already committed."""

    path: Path
    fd: int
    rows: int
    done: int = 0
    offset: int = 0  # where line `done` starts, so a replay resumes without rereading
    sealed: bool = False  # no more appends; only sealed segments are replayed or dropped
    busy: bool = False  # being replayed: not to be dropped under the writer

    @property
    def pending(self) -> int:
        return self.rows - self.done


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for _ in f)


def _close_at_exit(ref: weakref.ref[PredictionLog]) -> None:
    if (plog := ref()) is not None:
        plog.close()


class PredictionLog:
    """Buffer predictions and labels in memory and write them to PostgreSQL from one thread.

    `submit()` never waits on the database. Rows wait in memory (up to `max_buffer`) and
    in spill files under `spill_dir` (up to `max_spill`) while PostgreSQL is away.
    """

    def __init__(
        self,
        database_url: str,
        spill_dir: Path,
        *,
        max_buffer: int = 10_000,
        batch_size: int = 500,
        flush_interval: float = 0.2,
        retry_interval: float = 1.0,
        max_spill: int = 1_000_000,
    ) -> None:
        self._url = database_url
        self._spill_dir = Path(spill_dir)
        self._max_buffer = max_buffer
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._retry_interval = retry_interval
        self._max_spill = max_spill
        self._segment_rows = max(1, max_spill // 10)
        self._prefix = f"predlog-{os.getpid()}-{secrets.token_hex(4)}"
        self._seq = 0

        self._lock = threading.Lock()  # the buffer and the counters below
        self._buffer: deque[Item] = deque()
        self._inflight = 0  # taken from the buffer, neither committed nor spilled yet
        self._closed = False
        self._dropped = 0
        self._rejected = 0

        self._spill_lock = threading.Lock()  # the segments and their files
        self._segments: list[_Segment] = []  # ours, oldest first
        self._orphans: list[_Segment] = []  # adopted from processes that are gone

        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._atexit = functools.partial(_close_at_exit, weakref.ref(self))
        # Only the writer thread touches these.
        self._conn: psycopg.Connection[Any] | None = None
        self._migrated = False
        self._db_up = False
        self._down_logged = False
        self._next_attempt = 0.0
        self._next_scan = 0.0
        self._deadline = math.inf

    # -- the service's side ------------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread; it connects, migrates and drains in the background."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="predlog-writer", daemon=True)
        self._thread.start()
        atexit.register(self._atexit)

    def submit(self, item: Prediction | Feedback) -> None:
        """Queue one row; with the buffer full it goes to the spill file instead."""
        with self._lock:
            if not self._closed and len(self._buffer) < self._max_buffer:
                self._buffer.append(item)
                if len(self._buffer) >= self._batch_size:
                    self._wake.set()
                return
        self._spill([item])

    def close(self, timeout: float = 10.0) -> None:
        """Write what `timeout` allows, spill the rest, stop the writer and release the files."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self._atexit)
        thread = self._thread
        if thread is None:
            self._spill_memory()
            self._release_files()
            return
        # Leave a tenth of the time to spill whatever could not be written.
        self._deadline = time.monotonic() + timeout * 0.9
        self._stop.set()
        self._wake.set()
        thread.join(timeout)
        if thread.is_alive():  # stuck in a database call; its one batch stays with it
            log.warning("prediction log: writer still busy after %.1f s; spilling", timeout)
            self._spill_memory()

    @property
    def depth(self) -> int:
        """Rows not yet in PostgreSQL: in memory, in flight and in spill files."""
        with self._lock:
            waiting = len(self._buffer) + self._inflight
        with self._spill_lock:
            return waiting + sum(s.pending for s in (*self._segments, *self._orphans))

    @property
    def db_up(self) -> bool:
        """Whether the last attempt to reach PostgreSQL and write succeeded."""
        return self._db_up

    @property
    def dropped(self) -> int:
        """Rows lost: deleted from a full spill, or unspillable (disk full)."""
        return self._dropped

    @property
    def rejected(self) -> int:
        """Rows PostgreSQL refused as data, kept in `*.rejected` files under spill_dir."""
        return self._rejected

    # -- the writer thread -------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # before the cycle: a submit during it wakes the next one
            try:
                self._cycle()
            except Exception:  # keep the only writer alive whatever happens
                log.exception("prediction log: unexpected error in the writer")
                self._went_down()
            self._wake.wait(self._flush_interval)
        self._finish()

    def _cycle(self) -> None:
        """One bounded round (some spill, then what memory held), so state and scans stay fresh."""
        if self._conn is None and time.monotonic() < self._next_attempt:
            # Database away: keep memory small and rows on disk until the next attempt.
            self._spill_memory()
            return
        try:
            conn = self._connection()
            if time.monotonic() >= self._next_scan:
                self._next_scan = time.monotonic() + ADOPT_INTERVAL
                self._adopt_orphans()
            self._replay(conn)
            self._drain(conn)
        except psycopg.Error as exc:
            if not self._down_logged:
                self._down_logged = True
                log.warning(
                    "prediction log: PostgreSQL unavailable (%s); spilling to %s",
                    str(exc).strip() or type(exc).__name__,
                    self._spill_dir,
                )
            self._went_down()
        else:
            if not self._db_up:
                log.info("prediction log: writing to PostgreSQL")
            self._db_up = True
            self._down_logged = False

    def _finish(self) -> None:
        """At close: write until done or the deadline (one attempt if down), spill the rest."""
        self._next_attempt = 0.0
        self._next_scan = math.inf
        while time.monotonic() < self._deadline:
            try:
                self._cycle()
            except Exception:
                log.exception("prediction log: unexpected error in the writer")
                break
            if not self._db_up or self.depth == 0:
                break
        self._spill_memory()
        self._disconnect()
        self._release_files()

    def _went_down(self) -> None:
        self._db_up = False
        self._disconnect()
        self._next_attempt = time.monotonic() + self._retry_interval
        self._spill_memory()

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is not None and not self._conn.broken and not self._conn.closed:
            return self._conn
        self._disconnect()
        conn = _connect(self._url)
        try:
            if not self._migrated:
                _apply_migrations(conn)
                self._migrated = True
            conn.execute(_TEMP_TABLES)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _take(self, limit: int | None = None) -> list[Item]:
        """Move up to `limit` rows (all by default) from the buffer to in flight."""
        with self._lock:
            n = len(self._buffer) if limit is None else min(limit, len(self._buffer))
            batch = [self._buffer.popleft() for _ in range(n)]
            self._inflight += n
        return batch

    def _done(self, batch: Sequence[Item]) -> None:
        with self._lock:
            self._inflight -= len(batch)

    def _spill_memory(self) -> None:
        batch = self._take()
        self._spill(batch)
        self._done(batch)

    def _drain(self, conn: psycopg.Connection[Any]) -> None:
        """Write the rows buffered now; under steady traffic the buffer is never empty."""
        with self._lock:
            left = len(self._buffer)
        while left > 0 and time.monotonic() < self._deadline:
            batch = self._take(min(left, self._batch_size))
            left -= len(batch)
            if not batch:
                return
            try:
                self._write(conn, batch)
            except BaseException:
                self._spill(batch)  # an unacknowledged commit is replayed harmlessly
                raise
            finally:
                self._done(batch)

    def _write(self, conn: psycopg.Connection[Any], batch: Sequence[Item]) -> None:
        """Write a batch; if PostgreSQL refuses a value, write row by row and set bad rows aside."""
        try:
            _write_batch(conn, batch)
        except _DATA_ERRORS as exc:
            if len(batch) == 1:
                self._reject(to_line(batch[0]), exc)
                return
            for item in batch:
                try:
                    _write_batch(conn, [item])
                except _DATA_ERRORS as row_exc:
                    self._reject(to_line(item), row_exc)

    def _reject(self, line: bytes, exc: Exception) -> None:
        log.warning("prediction log: PostgreSQL refused a row (%s); set aside", exc)
        doc = {"error": str(exc).strip(), "line": line.decode(errors="replace").rstrip("\n")}
        path = self._spill_dir / f"{self._prefix}.rejected"
        with self._lock:
            self._rejected += 1
        try:
            self._spill_dir.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(doc) + "\n")
        except OSError:
            log.exception("prediction log: cannot keep a rejected row in %s", path)

    # -- spill -------------------------------------------------------------------------

    def _spill(self, items: Sequence[Item]) -> None:
        """Append rows to our newest spill file; never raises (a lost row counts as dropped)."""
        if not items:
            return
        try:
            data = b"".join(map(to_line, items))
            with self._spill_lock:
                segment = self._current_segment()
                _write_all(segment.fd, data)
                segment.rows += len(items)
                if segment.rows >= self._segment_rows:
                    segment.sealed = True
                self._enforce_limit()
        except Exception:
            log.exception("prediction log: cannot spill %d rows; dropped", len(items))
            with self._lock:
                self._dropped += len(items)

    def _current_segment(self) -> _Segment:
        if self._segments and not self._segments[-1].sealed:
            return self._segments[-1]
        self._spill_dir.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        path = self._spill_dir / f"{self._prefix}-{self._seq:06d}{SPILL_SUFFIX}"
        # Lock under a name other writers ignore, then show it: never seen unlocked.
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            tmp.rename(path)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        segment = _Segment(path, fd, rows=0)
        self._segments.append(segment)
        return segment

    def _enforce_limit(self) -> None:
        """Past max_spill, delete the oldest segment (caller holds the spill lock)."""
        while sum(s.pending for s in self._segments) > self._max_spill:
            oldest = next((s for s in self._segments if s.sealed and not s.busy), None)
            if oldest is None:
                return
            log.warning(
                "prediction log: spill over %d rows; dropping the oldest %d",
                self._max_spill,
                oldest.pending,
            )
            with self._lock:
                self._dropped += oldest.pending
            self._segments.remove(oldest)
            self._remove_file(oldest)

    @staticmethod
    def _remove_file(segment: _Segment) -> None:
        # Unlink before unlocking, so no other writer can adopt a file we are done with.
        segment.path.unlink(missing_ok=True)
        if segment.fd >= 0:
            os.close(segment.fd)
            segment.fd = -1

    def _release_files(self) -> None:
        """Unlock our spill files (left for a later writer) and stop appending to them."""
        with self._spill_lock:
            for segment in (*self._segments, *self._orphans):
                segment.sealed = True
                if segment.fd >= 0:
                    os.close(segment.fd)
                    segment.fd = -1

    def _adopt_orphans(self) -> None:
        """Take over spill files whose writer is gone: those nobody holds a lock on."""
        ours = {s.path for s in (*self._segments, *self._orphans)}
        found: list[tuple[float, Path]] = []
        with contextlib.suppress(FileNotFoundError):
            for path in self._spill_dir.glob(f"*{SPILL_SUFFIX}"):
                with contextlib.suppress(FileNotFoundError):
                    found.append((path.stat().st_mtime, path))
        for _, path in sorted(found):
            if path in ours:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = os.fstat(fd)
                current = path.stat()  # replayed and deleted while we waited?
                if (held.st_dev, held.st_ino) != (current.st_dev, current.st_ino):
                    raise FileNotFoundError(path)
                rows = _count_lines(path)
            except OSError:  # BlockingIOError: a live writer holds it
                os.close(fd)
                continue
            log.info("prediction log: adopting %d spilled rows from %s", rows, path.name)
            with self._spill_lock:
                self._orphans.append(_Segment(path, fd, rows=rows, sealed=True))

    def _replay(self, conn: psycopg.Connection[Any]) -> None:
        """Write some spilled rows, oldest file first; delete a file once all are committed."""
        with self._spill_lock:
            if self._segments and not self._segments[-1].sealed:
                self._segments[-1].sealed = True
            queue = [*self._orphans, *self._segments]
        budget = self._batch_size * REPLAY_BATCHES
        for segment in queue:
            if budget <= 0:
                self._wake.set()  # more to replay: no pause before the next cycle
                return
            with self._spill_lock:
                if segment.fd < 0:  # dropped meanwhile
                    continue
                segment.busy = True
            try:
                finished, written = self._replay_segment(conn, segment, budget)
                budget -= written
            except OSError:  # deleted or unreadable behind our back: nothing left to replay
                log.exception("prediction log: cannot read %s; its rows are lost", segment.path)
                with self._lock:
                    self._dropped += segment.pending
                finished = True
            finally:
                with self._spill_lock:
                    segment.busy = False
            if not finished:
                self._wake.set()
                return
            with self._spill_lock:
                for owner in (self._segments, self._orphans):
                    if segment in owner:
                        owner.remove(segment)
                self._remove_file(segment)

    def _replay_segment(
        self, conn: psycopg.Connection[Any], segment: _Segment, budget: int
    ) -> tuple[bool, int]:
        """Write up to `budget` pending rows of a segment; (all done?, rows written)."""
        written = 0
        with segment.path.open("rb") as f:
            f.seek(segment.offset)
            while written < budget and time.monotonic() < self._deadline:
                size = min(self._batch_size, budget - written)
                lines = [line for _, line in zip(range(size), f, strict=False)]
                if not lines:
                    return True, written
                self._write(conn, list(self._parse(lines)))
                written += len(lines)
                with self._spill_lock:
                    segment.done += len(lines)
                    segment.offset += sum(map(len, lines))
            return segment.pending == 0, written

    def _parse(self, lines: Iterable[bytes]) -> Iterable[Item]:
        for line in lines:
            try:
                yield from_line(line)
            except ValueError as exc:  # a line cut short when its writer was killed
                self._reject(line, exc)


# -- batch jobs ------------------------------------------------------------------------

_BATCH_STAGING = (
    "CREATE TEMP TABLE predlog_batch_in (LIKE predictions INCLUDING DEFAULTS) ON COMMIT DROP"
)
_BATCH_COLUMNS = f"{_PREDICTION_COLUMNS}, batch_id"
_COPY_BATCH = f"COPY predlog_batch_in ({_BATCH_COLUMNS}) FROM STDIN (FORMAT csv)"
_INSERT_BATCH = (
    f"INSERT INTO predictions ({_BATCH_COLUMNS})"
    f" SELECT {_BATCH_COLUMNS} FROM predlog_batch_in"
    " ON CONFLICT (request_id) DO NOTHING"
)


class BatchLogWriter:
    """A batch job's predictions in one transaction: all of them, or none.

    `write` COPYs an Arrow table (columns named as the `predictions` table's, inputs and
    probabilities as JSON text) into a staging table; `commit` inserts the rows not logged
    yet (ON CONFLICT DO NOTHING) and returns how many were new. Leaving the `with` block
    without `commit` rolls everything back.
    """

    def __init__(self, database_url: str) -> None:
        self._url = database_url
        self._conn: psycopg.Connection[Any] | None = None

    def __enter__(self) -> BatchLogWriter:
        migrate(self._url)
        self._conn = psycopg.connect(
            _conninfo(self._url),
            connect_timeout=CONNECT_TIMEOUT,
            keepalives=1,
            keepalives_idle=5,
            keepalives_interval=2,
            keepalives_count=2,
            application_name="predlog-batch",
        )
        self._conn.execute(_BATCH_STAGING)
        return self

    def write(self, rows: pa.Table) -> None:
        """COPY one chunk (a pyarrow Table with the prediction columns + batch_id) into staging."""
        buf = io.BytesIO()
        table = rows.select(_BATCH_COLUMNS.split(", "))
        pacsv.write_csv(table, buf, pacsv.WriteOptions(include_header=False))
        with self._connection().cursor() as cur, cur.copy(_COPY_BATCH) as copy:
            copy.write(buf.getbuffer())

    def commit(self) -> int:
        """Insert what is new and commit; the number of rows inserted."""
        conn = self._connection()
        with conn.cursor() as cur:
            cur.execute(_INSERT_BATCH)
            inserted = cur.rowcount
        conn.commit()
        return inserted

    def __exit__(self, *exc: object) -> None:
        if self._conn is not None:
            self._conn.rollback()
            self._conn.close()
            self._conn = None

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None:
            raise RuntimeError("BatchLogWriter is used outside its `with` block")
        return self._conn
