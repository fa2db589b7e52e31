"""The prediction log: every prediction, late label and serving error, written to PostgreSQL
off the request path.

The service calls `PredictionLog.submit()`, which only appends to a bounded in-memory
buffer; one writer thread writes batches (COPY into a temp table, then INSERT ... ON
CONFLICT). While PostgreSQL is away, rows go to spill files (JSON lines under `spill_dir`)
and are written back, oldest first, once it answers again. Delivery is at least once and
every write is idempotent (a prediction or a serving error is inserted ON CONFLICT DO
NOTHING; a label
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
import json
import logging
import math
import os
import secrets
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from common.store.connection import connect
from common.store.migrations import apply_migrations
from common.store.rows import (
    Item,
    create_staging,
    from_line,
    to_line,
    write_items,
)
from common.store.tenants import scope

log = logging.getLogger(__name__)

# How often a running writer looks for spill files left by processes that are gone.
ADOPT_INTERVAL = 10.0
SPILL_SUFFIX = ".jsonl"
# Spilled batches a writer cycle replays before it turns to the rows in memory.
REPLAY_BATCHES = 20
_DATA_ERRORS = (psycopg.DataError, psycopg.IntegrityError)


_EXISTS = "SELECT 1 FROM predictions WHERE request_id = %s"


def prediction_exists(
    database: str | ConnectionPool[psycopg.Connection[Any]], request_id: str, tenant: str
) -> bool | None:
    """Whether `tenant` logged `request_id`; None when PostgreSQL cannot be reached.

    Another tenant's prediction is not found, exactly as an unknown one is: the lookup runs
    in `tenant`'s scope, so row-level security hides every other row. `database` is a
    DATABASE_URL (a connection for this one call) or an open `pool`. False may also mean
    the prediction is still buffered, so feedback should be accepted either way (the
    feedback table has no foreign key for this reason).
    """
    try:
        uuid.UUID(request_id)
    except ValueError:
        return False
    try:
        with contextlib.ExitStack() as stack:
            if isinstance(database, str):
                conn = stack.enter_context(connect(database))
            else:
                conn = stack.enter_context(database.connection())
            with conn.transaction():
                scope(conn, tenant)
                row = conn.execute(_EXISTS, [request_id]).fetchone()
    except (psycopg.OperationalError, PoolTimeout):
        return None
    return row is not None


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

        self._spill_lock = threading.RLock()  # the segments and their files; before _lock
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

    def submit(self, item: Item) -> None:
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
        # Both locks at once: a row moving from flight to a spill file is counted once.
        with self._spill_lock, self._lock:
            waiting = len(self._buffer) + self._inflight
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
        conn = connect(self._url)
        try:
            if not self._migrated:
                apply_migrations(conn)
                self._migrated = True
            create_staging(conn)
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
        self._spill_from_flight(self._take())

    def _spill_from_flight(self, batch: Sequence[Item]) -> None:
        """Spill rows taken from the buffer: they leave flight and enter the file in one step."""
        with self._spill_lock:
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
                # An unacknowledged commit is replayed harmlessly.
                self._spill_from_flight(batch)
                raise
            self._done(batch)

    def _write(self, conn: psycopg.Connection[Any], batch: Sequence[Item]) -> None:
        """Write a batch; if PostgreSQL refuses a value, write row by row and set bad rows aside."""
        try:
            write_items(conn, batch)
        except _DATA_ERRORS as exc:
            if len(batch) == 1:
                self._reject(to_line(batch[0]), exc)
                return
            for item in batch:
                try:
                    write_items(conn, [item])
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
