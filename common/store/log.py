"""The prediction log: every prediction, late label and serving error, written ahead to a
local file before the service answers, then to PostgreSQL off the request path.

`PredictionLog.submit()` appends the row's line to the current write-ahead segment (one
`write()` under a lock, JSON lines under `spill_dir`) and returns: the page cache then
holds it, so a `kill -9` of the process loses nothing it acknowledged. A sync thread
`fsync`s the segments every `sync_interval` seconds (0: each append before `submit()`
returns). One writer thread reads the segments and writes batches to PostgreSQL (COPY into
a temp table, then INSERT ... ON CONFLICT), records per segment how many lines are
committed, and deletes a segment once it is sealed and all its lines are. Every write is
idempotent (a prediction or a serving error is inserted ON CONFLICT DO NOTHING; a label
replaces an earlier one only if its `ts` is not older), so a replay after a partial
failure or a crash never duplicates: each acknowledged row ends up logged exactly once.

Segments are named `predlog-<pid>-<token>-<seq>.jsonl` and held with `flock` by the
process writing them. Any writer adopts and replays `*.jsonl` files in `spill_dir` that no
live process holds, so rows written by a worker that exited or was killed are not lost.
`flock` needs `spill_dir` on a local disk. The writer applies pending migrations when it
first connects, so a service that started while PostgreSQL was down still gets its tables.

Guarantees and known limits:
- A row is acknowledged only once its line is in the segment: when the line cannot be
  written (disk full, EIO) or `max_spill` rows are not yet committed, `submit()` raises
  `LogRefusedError`, nothing of that call is kept, and `ready()` is False until a write
  can succeed again. Nothing acknowledged is ever deleted to make room.
- A host crash (power, kernel) can lose what was written in the last `sync_interval`
  seconds before it; a process crash loses nothing acknowledged. An fsync that fails
  (EIO) after rows were acknowledged is counted in `write_failures`, not undone.
- The disk holds every row not yet committed (up to `max_spill`, ~0.4 kB a prediction):
  size `spill_dir` for the longest PostgreSQL outage to ride out; past that, 503s.
- Rows PostgreSQL refuses as data (a value of the wrong type, a NUL in text), and a line
  cut short by a crash in the middle of its write (never acknowledged), are set aside in
  `*.rejected` files and counted in `rejected`, so one bad row cannot block the rest.
- A segment of a dead process is replayed by the next writer that scans the directory
  (every `ADOPT_INTERVAL` seconds while PostgreSQL answers); until then its rows wait.
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
# Batches a writer cycle writes before it looks at its state and the directory again.
REPLAY_BATCHES = 20
# Bytes ready() writes to see whether a full disk has room again.
PROBE_BYTES = 64 * 1024
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


# -- write-ahead segments --------------------------------------------------------------


class LogRefusedError(Exception):
    """`submit()` could not write its rows ahead: none of them was kept; answer 503."""

    def __init__(self, reason: str, retry_after: int = 1) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


@dataclass(frozen=True)
class LogStats:
    """Counts since the log started (rows, bytes) and its backlog now, for /metrics."""

    written_rows: int
    written_bytes: int
    committed_rows: int
    committed_bytes: int
    rejected_rows: int
    refused_rows: int
    write_failures: int
    backlog_rows: int
    backlog_bytes: int
    fsync_lag: float  # seconds the oldest line not yet fsynced has waited; 0 if none


@dataclass(eq=False)
class _Segment:
    """A segment we hold `flock` on: `rows` complete lines (`size` bytes), the first `done`
    (`offset` bytes) committed or set aside."""

    path: Path
    fd: int
    rows: int = 0
    size: int = 0
    done: int = 0
    offset: int = 0
    sealed: bool = False  # no more appends; deleted once every line is done
    synced: int = 0  # bytes known to be fsynced
    dirty_since: float = 0.0  # monotonic time of the oldest line not fsynced; 0 if none

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
    """Write predictions and labels ahead to local segments, then to PostgreSQL from one thread.

    `submit()` never waits on the database: it appends to a segment and returns, or raises
    `LogRefusedError`. At most `max_spill` rows wait uncommitted (in segments of a tenth of
    that, at most `max_segment_rows`).
    """

    def __init__(
        self,
        database_url: str,
        spill_dir: Path,
        *,
        batch_size: int = 500,
        flush_interval: float = 0.2,
        retry_interval: float = 1.0,
        max_spill: int = 1_000_000,
        max_segment_rows: int = 10_000,
        sync_interval: float = 1.0,
    ) -> None:
        self._url = database_url
        self._spill_dir = Path(spill_dir)
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._retry_interval = retry_interval
        self._max_spill = max_spill
        self._segment_rows = max(1, min(max_spill // 10, max_segment_rows))
        self._sync_interval = sync_interval
        self._prefix = f"predlog-{os.getpid()}-{secrets.token_hex(4)}"
        self._seq = 0

        # The segments, the counters and the backlog; held for one write() in submit().
        self._lock = threading.Lock()
        self._segments: list[_Segment] = []  # ours, oldest first; the last takes appends
        self._orphans: list[_Segment] = []  # adopted from processes that are gone
        self._closed = False
        self._backlog = 0
        self._backlog_bytes = 0
        self._written = 0
        self._written_bytes = 0
        self._committed = 0
        self._committed_bytes = 0
        self._rejected = 0
        self._refused = 0
        self._failures = 0
        self._unwritable = False  # the last write failed; cleared by a write or a probe
        self._new_files = False  # segments created since the directory was last fsynced
        self._next_probe = 0.0

        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._syncer: threading.Thread | None = None
        self._atexit = functools.partial(_close_at_exit, weakref.ref(self))
        # Only the writer thread touches these.
        self._conn: psycopg.Connection[Any] | None = None
        self._migrated = False
        self._db_up = False
        self._down_logged = False
        self._next_attempt = 0.0
        self._next_scan = 0.0
        self._deadline = math.inf
        self._unparsed = 0  # lines of the batch being parsed that were not rows

    # -- the service's side ------------------------------------------------------------

    def start(self) -> None:
        """Start the writer (and the sync) thread; it connects, migrates and drains."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="predlog-writer", daemon=True)
        self._thread.start()
        if self._sync_interval > 0:
            self._syncer = threading.Thread(
                target=self._sync_loop, name="predlog-sync", daemon=True
            )
            self._syncer.start()
        atexit.register(self._atexit)

    def submit(self, item: Item) -> None:
        """Write one row ahead; when this returns it survives the process. LogRefusedError
        if it cannot (disk full, I/O error, backlog at `max_spill`): then it was not kept."""
        self._append([item])

    def submit_many(self, items: Sequence[Item]) -> None:
        """Write rows ahead all together (one write) or none of them (LogRefusedError)."""
        if items:
            self._append(items)

    def ready(self) -> bool:
        """Whether a submit() can be kept now: the backlog is under `max_spill`, and the disk
        has room (after a failed write: a probe write succeeds, tried once a second)."""
        with self._lock:
            if self._closed or self._backlog >= self._max_spill:
                return False
            if not self._unwritable:
                return self._room()
            if time.monotonic() < self._next_probe:
                return False
            self._next_probe = time.monotonic() + 1.0
        if self._probe():
            with self._lock:
                self._unwritable = False
            return True
        return False

    def close(self, timeout: float = 10.0) -> None:
        """Write what `timeout` allows, fsync, stop the threads and release the segments;
        what was not committed stays in them for the next writer."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self._atexit)
        thread = self._thread
        if thread is None:
            self._sync()
            self._release_files()
            return
        self._deadline = time.monotonic() + timeout * 0.9
        self._stop.set()
        self._wake.set()
        thread.join(timeout)
        if thread.is_alive():  # stuck in a database call; the segments stay ours until exit
            log.warning("prediction log: writer still busy after %.1f s", timeout)
            self._sync()
        if self._syncer is not None:
            self._syncer.join(timeout)

    @property
    def depth(self) -> int:
        """Rows not yet committed to PostgreSQL: in our segments and in adopted ones."""
        return self._backlog

    @property
    def db_up(self) -> bool:
        """Whether the last attempt to reach PostgreSQL and write succeeded."""
        return self._db_up

    @property
    def rejected(self) -> int:
        """Rows PostgreSQL refused as data, kept in `*.rejected` files under spill_dir."""
        return self._rejected

    @property
    def refused(self) -> int:
        """Rows submit() refused (LogRefusedError): never acknowledged, so never lost."""
        return self._refused

    def stats(self) -> LogStats:
        """A consistent snapshot of the counters and the backlog."""
        now = time.monotonic()
        with self._lock:
            dirty = [s.dirty_since for s in self._segments if s.dirty_since > 0]
            return LogStats(
                written_rows=self._written,
                written_bytes=self._written_bytes,
                committed_rows=self._committed,
                committed_bytes=self._committed_bytes,
                rejected_rows=self._rejected,
                refused_rows=self._refused,
                write_failures=self._failures,
                backlog_rows=self._backlog,
                backlog_bytes=self._backlog_bytes,
                fsync_lag=now - min(dirty) if dirty else 0.0,
            )

    # -- writing ahead -----------------------------------------------------------------

    def _append(self, items: Sequence[Item]) -> None:
        data = b"".join(map(to_line, items))  # encoded before the lock
        n = len(items)
        with self._lock:
            if self._closed:
                self._refused += n
                raise LogRefusedError("the prediction log is closed")
            if self._backlog + n > self._max_spill:
                self._refused += n
                raise LogRefusedError(
                    f"the prediction log holds {self._backlog} rows not yet in PostgreSQL "
                    f"(at most {self._max_spill})",
                    retry_after=max(1, math.ceil(self._retry_interval)),
                )
            try:
                segment = self._current_segment()
                self._write_ahead(segment, data, n)
            except OSError as exc:
                self._failures += 1
                self._refused += n
                self._unwritable = True
                raise LogRefusedError(f"the prediction log cannot be written: {exc}") from exc
            self._unwritable = False
            self._backlog += n
            self._backlog_bytes += len(data)
            self._written += n
            self._written_bytes += len(data)
            if self._db_up and self._backlog >= self._batch_size:
                self._wake.set()  # a batch is ready: no need to wait for the interval

    def _write_ahead(self, segment: _Segment, data: bytes, n: int) -> None:
        """Append whole lines to `segment` (caller holds the lock); on failure, none stays."""
        try:
            _write_all(segment.fd, data)
            if self._sync_interval <= 0:
                os.fsync(segment.fd)
        except OSError:
            try:  # a short write must not leave half a line for the next one to follow
                os.ftruncate(segment.fd, segment.size)
            except OSError:
                segment.sealed = True  # its tail may be torn: append nothing after it
            raise
        if self._sync_interval <= 0:
            segment.synced = segment.size + len(data)
        elif segment.dirty_since == 0.0:
            segment.dirty_since = time.monotonic()
        segment.rows += n
        segment.size += len(data)
        if segment.rows >= self._segment_rows:
            segment.sealed = True

    def _current_segment(self) -> _Segment:
        """Our segment taking appends, created when there is none (caller holds the lock)."""
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
        segment = _Segment(path, fd)
        self._segments.append(segment)
        self._new_files = True
        if self._sync_interval <= 0:
            self._sync_directory()
        return segment

    def _room(self) -> bool:
        """Whether `spill_dir`'s disk has room for a probe's worth of lines (another worker
        may have found it full before this one tried)."""
        where = self._spill_dir
        while not where.exists() and where != where.parent:  # not made yet: its disk
            where = where.parent
        try:
            disk = os.statvfs(where)
        except OSError:
            return False
        return disk.f_bavail * disk.f_frsize >= PROBE_BYTES

    def _probe(self) -> bool:
        """Whether `spill_dir` takes a write of a few lines again (after a failed one)."""
        path = self._spill_dir / f"{self._prefix}.probe"
        try:
            self._spill_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _write_all(fd, b"\n" * PROBE_BYTES)
            finally:
                os.close(fd)
                path.unlink(missing_ok=True)
        except OSError:
            return False
        return True

    def _sync_directory(self) -> None:
        fd = os.open(self._spill_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _sync_loop(self) -> None:
        while not self._stop.wait(self._sync_interval):
            self._sync()
        self._sync()

    def _sync(self) -> None:
        """fsync every segment with lines written since its last fsync (and the directory,
        if a segment was created since: a host crash must not lose the file's name)."""
        with self._lock:
            new_files, self._new_files = self._new_files, False
            dirty = []
            for segment in self._segments:
                if segment.fd >= 0 and segment.synced < segment.size:
                    # A duplicate: the writer may close the segment's own fd meanwhile.
                    dirty.append((segment, os.dup(segment.fd), segment.size, time.monotonic()))
        for segment, fd, size, at in dirty:
            try:
                os.fsync(fd)
            except OSError:
                log.exception("prediction log: cannot fsync %s", segment.path.name)
                with self._lock:
                    self._failures += 1
                continue
            finally:
                os.close(fd)
            with self._lock:
                segment.synced = max(segment.synced, size)
                if segment.synced >= segment.size:
                    segment.dirty_since = 0.0
                elif segment.dirty_since < at:
                    segment.dirty_since = at  # lines written after the fsync began
        if new_files:
            try:
                self._sync_directory()
            except OSError:
                log.exception("prediction log: cannot fsync %s", self._spill_dir)
                with self._lock:
                    self._new_files = True

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
        """One bounded round of shipping, so state and scans stay fresh."""
        if self._conn is None and time.monotonic() < self._next_attempt:
            return  # database away: rows wait in the segments until the next attempt
        try:
            conn = self._connection()
            if time.monotonic() >= self._next_scan:
                self._next_scan = time.monotonic() + ADOPT_INTERVAL
                self._adopt_orphans()
            self._ship(conn)
        except psycopg.Error as exc:
            if not self._down_logged:
                self._down_logged = True
                log.warning(
                    "prediction log: PostgreSQL unavailable (%s); rows wait in %s",
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
        """At close: write until done or the deadline (one attempt if down), then fsync and
        release the segments (deleting those fully committed)."""
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
        self._sync()
        self._disconnect()
        self._release_files()

    def _went_down(self) -> None:
        self._db_up = False
        self._disconnect()
        self._next_attempt = time.monotonic() + self._retry_interval

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

    def _ship(self, conn: psycopg.Connection[Any]) -> None:
        """Write some pending lines, adopted segments first, then ours oldest first; delete
        a sealed segment once all its lines are done."""
        with self._lock:
            queue = [*self._orphans, *self._segments]
        budget = self._batch_size * REPLAY_BATCHES
        for segment in queue:
            if budget <= 0:
                self._wake.set()  # more to write: no pause before the next cycle
                return
            try:
                budget -= self._ship_segment(conn, segment, budget)
            except FileNotFoundError:  # deleted behind our back: its rows are gone
                log.error(
                    "prediction log: %s was deleted; %d rows lost", segment.path, segment.pending
                )
                with self._lock:
                    self._backlog -= segment.pending
                    self._backlog_bytes -= segment.size - segment.offset
                    self._failures += 1
                    segment.done = segment.rows
                    segment.sealed = True
            except OSError:  # unreadable now; tried again next cycle
                log.exception("prediction log: cannot read %s", segment.path)
                continue
            with self._lock:
                if not (segment.sealed and segment.pending <= 0):
                    continue
                for owner in (self._segments, self._orphans):
                    if segment in owner:
                        owner.remove(segment)
                self._remove_file(segment)

    def _ship_segment(self, conn: psycopg.Connection[Any], segment: _Segment, budget: int) -> int:
        """Write up to `budget` of a segment's pending lines; how many were written."""
        with self._lock:
            start, end = segment.offset, segment.size  # complete lines only
        if start >= end:
            return 0
        written = 0
        with segment.path.open("rb") as f:
            f.seek(start)
            position = start
            while written < budget and position < end and time.monotonic() < self._deadline:
                lines: list[bytes] = []
                limit = min(self._batch_size, budget - written)
                while len(lines) < limit and position < end:
                    line = f.readline(end - position)
                    if not line:
                        break
                    lines.append(line)
                    position += len(line)
                if not lines:
                    break
                rejected = self._write(conn, list(self._parse(lines)))
                rejected += self._unparsed
                self._unparsed = 0
                size = sum(map(len, lines))
                written += len(lines)
                with self._lock:
                    segment.done += len(lines)
                    segment.offset = position
                    self._backlog -= len(lines)
                    self._backlog_bytes -= size
                    self._committed += len(lines) - rejected
                    self._committed_bytes += size
        return written

    def _write(self, conn: psycopg.Connection[Any], batch: Sequence[Item]) -> int:
        """Write a batch; if PostgreSQL refuses a value, write row by row and set bad rows
        aside. How many were set aside."""
        try:
            write_items(conn, batch)
        except _DATA_ERRORS as exc:
            if len(batch) == 1:
                self._reject(to_line(batch[0]), exc)
                return 1
            rejected = 0
            for item in batch:
                try:
                    write_items(conn, [item])
                except _DATA_ERRORS as row_exc:
                    self._reject(to_line(item), row_exc)
                    rejected += 1
            return rejected
        return 0

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

    def _parse(self, lines: Iterable[bytes]) -> Iterable[Item]:
        for line in lines:
            try:
                yield from_line(line)
            except ValueError as exc:  # a line cut short when its writer was killed
                self._reject(line, exc)
                self._unparsed += 1

    # -- segment files -----------------------------------------------------------------

    @staticmethod
    def _remove_file(segment: _Segment) -> None:
        # Unlink before unlocking, so no other writer can adopt a file we are done with.
        segment.path.unlink(missing_ok=True)
        if segment.fd >= 0:
            os.close(segment.fd)
            segment.fd = -1

    def _release_files(self) -> None:
        """Delete the segments fully committed, unlock the rest (left for a later writer)."""
        with self._lock:
            for segment in (*self._segments, *self._orphans):
                segment.sealed = True
                if segment.pending <= 0:
                    self._remove_file(segment)
                elif segment.fd >= 0:
                    os.close(segment.fd)
                    segment.fd = -1

    def _adopt_orphans(self) -> None:
        """Take over segments whose writer is gone: those nobody holds a lock on."""
        with self._lock:
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
            log.info("prediction log: adopting %d rows from %s", rows, path.name)
            size = held.st_size
            with self._lock:
                self._orphans.append(
                    _Segment(path, fd, rows=rows, size=size, sealed=True, synced=size)
                )
                self._backlog += rows
                self._backlog_bytes += size
