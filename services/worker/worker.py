"""The worker's loop: read each served tenant's chunks, score, write and acknowledge.

Delivery is at least once: a chunk is hidden from other workers for JOB_VISIBILITY_TIMEOUT
while this one scores it, and `jobs.complete` writes its result and deletes its message in
one transaction, so a worker that dies (or a database that restarts) before that commit
leaves the chunk to come back, and a chunk scored twice is written once. A chunk that fails
is retried after a short backoff and dead-lettered at its JOB_MAX_TRIES-th delivery; a model
the registry cannot give now is not the chunk's fault, so those chunks only wait.

The loop holds one connection; when PostgreSQL goes away it reconnects with backoff and
goes on (the chunks it held come back after their visibility timeout).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg

from common import callbacks
from common.registry.runtime import ModelRuntime, ModelUnavailableError
from common.registry.served import ServedModel
from common.settings import Settings
from common.store import connect, create_staging, jobs
from services.worker import metrics
from services.worker.scoring import Failed, reason, score

log = logging.getLogger("worker")

RELIST_SECONDS = 30.0
"""How often a worker serving every granted tenant looks for new ones."""
DEPTH_SECONDS = 2.0
"""How often the queue gauges are refreshed (when metrics are served)."""
PURGE_SECONDS = 300.0
"""How often ended jobs past JOB_RETENTION_HOURS are removed."""
MODEL_WAIT_SECONDS = 10.0
"""Longest wait of chunks whose model cannot be loaded now (the registry is away); a
visibility timeout shorter than this is the wait."""
CALLBACK_SECONDS = 2.0
"""How often a worker looks for callbacks due (a job it ends makes it look at once)."""
CALLBACK_LEASE = 60.0
"""Seconds a claimed callback is left to its worker before another may send it."""
CALLBACK_TRIES = 5
"""Attempts at a job's callback before it is given up (each recorded on the job)."""
MAX_BACKOFF = 5.0
"""Longest pause between reconnection attempts, and the longest retry backoff's unit."""


@dataclass(frozen=True)
class Options:
    """The command line: which tenants, how many chunks per read, when to exit."""

    tenants: tuple[str, ...] = ()
    """Empty: every tenant whose request queue the role may consume, re-listed."""
    batch: int = 32
    poll: float = 0.5
    idle_exit: float | None = None
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"


def backoff(read_ct: int) -> float:
    """Seconds before a failed chunk's next delivery: 1, 2, 4, ... at most 60."""
    return float(min(2 ** max(read_ct - 1, 0), 60))


def _broken(conn: psycopg.Connection[Any] | None, exc: BaseException) -> bool:
    """Whether `exc` means the connection is gone (rather than this statement failed)."""
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError) or (
        conn is not None and (conn.closed or conn.broken)
    )


class Models:
    """The runtime of the predictor, created on first success: a worker may start while
    the registry is away and score once it answers. Jobs are scored by the champion only,
    so it never loads a challenger or a shadow."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runtime: ModelRuntime | None = None

    def get(self, tenant: str) -> ServedModel:
        """`tenant`'s model (its own champion, else the shared one); ModelUnavailableError."""
        return self.start().serving(tenant)

    def start(self) -> ModelRuntime:
        """The runtime, created (the shared model loaded) and its poller started on first
        success; ModelUnavailableError while the registry cannot give a model."""
        if self.runtime is None:
            try:
                runtime = ModelRuntime(self.settings, follow_variants=False)
            except Exception as exc:  # registry away, alias not set: wait, do not fail chunks
                raise ModelUnavailableError(f"no model to serve now: {reason(exc)}") from exc
            runtime.start()
            self.runtime = runtime
        return self.runtime

    def stop(self) -> None:
        if self.runtime is not None:
            self.runtime.stop()


class Callbacks:
    """Signed POSTs of ended jobs, off the scoring loop (a slow receiver holds up nobody).

    At least once: the loop claims due callbacks (`jobs.claim_callbacks`, a lease each), so
    a callback whose worker died before its POST, or whose receiver failed, is claimed again
    later, up to CALLBACK_TRIES attempts with backoff.
    """

    def __init__(self, settings: Settings) -> None:
        assert settings.database_url
        self.database_url = settings.database_url
        self.hosts = callbacks.allowed_hosts(settings.job_callback_hosts)
        secret = settings.job_callback_secret
        self.secret = secret.get_secret_value() if secret else None
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="callback")

    def send(self, job: jobs.Job) -> None:
        if job.callback_url:
            self.pool.submit(self._deliver, job, job.callback_url)

    def _deliver(self, job: jobs.Job, url: str) -> None:
        retry_in: float | None = None
        try:  # the allow-list may have shrunk since the job was accepted
            callbacks.check_url(url, self.hosts)
        except ValueError as exc:
            status = f"refused: {exc}"
        else:
            status = callbacks.deliver(url, job.summary(), self.secret)
            if status != "delivered":
                if job.callback_attempts < CALLBACK_TRIES:
                    retry_in = backoff(job.callback_attempts + 1)
                else:
                    status = f"gave up after {job.callback_attempts} attempts: {status}"
        try:
            with connect(self.database_url, application_name="mlops-worker") as conn:
                jobs.record_callback(conn, job, status, retry_in=retry_in)
        except psycopg.Error as exc:  # its lease ends: another claim sends it again
            log.warning("job %s: callback %s; not recorded: %s", job.id, status, reason(exc))

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class Worker:
    """One worker process's loop (`run`); `stop` (SIGTERM) ends it after the batch in hand."""

    def __init__(self, settings: Settings, options: Options) -> None:
        assert settings.database_url
        self.settings = settings
        self.options = options
        self.database_url = settings.database_url
        self.models = Models(settings)
        self.callbacks = Callbacks(settings)
        self.stopping = threading.Event()
        self.conn: psycopg.Connection[Any] | None = None
        self.tenants: list[str] = []
        self._skipped: set[str] = set()
        self._due = {"relist": 0.0, "depths": 0.0, "purge": 0.0, "callbacks": 0.0}
        self._down_since: float | None = None

    def stop(self) -> None:
        self.stopping.set()

    def warm(self) -> None:
        """Load the shared model now, so the first chunks do not wait for it (best effort)."""
        try:
            self.models.start()
        except ModelUnavailableError as exc:
            log.warning("%s; chunks wait until it can be loaded", exc)

    def run(self) -> str:
        """Serve until stopped or idle for `idle_exit` seconds; why it ended."""
        idle_since = time.monotonic()
        while not self.stopping.is_set():
            try:
                conn = self._connection()
                if conn is None:
                    break
                if self._round(conn):
                    idle_since = time.monotonic()
                    continue
            except psycopg.Error as exc:
                if not _broken(self.conn, exc):
                    raise
                self._lost(exc)
                idle_since = time.monotonic()  # a database away is not an idle queue
                continue
            idle = time.monotonic() - idle_since
            if self.options.idle_exit is not None and idle >= self.options.idle_exit:
                return f"idle for {idle:.1f} s"
            self.stopping.wait(self.options.poll)
        return "stopped"

    def close(self) -> None:
        self.callbacks.close()
        self.models.stop()
        if self.conn is not None:
            self.conn.close()

    # -- the connection ------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any] | None:
        """The loop's connection, reconnecting with backoff; None if stopped meanwhile."""
        if self.conn is not None:
            return self.conn
        delay = 0.2
        while not self.stopping.is_set():
            try:
                conn = connect(self.database_url, application_name="mlops-worker")
                create_staging(conn)
            except psycopg.OperationalError as exc:
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    log.warning("database unreachable, retrying: %s", reason(exc))
                self.stopping.wait(delay)
                delay = min(delay * 2, MAX_BACKOFF)
                continue
            if self._down_since is not None:
                away = time.monotonic() - self._down_since
                log.info("database reachable again after %.1f s", away)
                self._down_since = None
            self.conn = conn
            return conn
        return None

    def _lost(self, exc: BaseException) -> None:
        log.warning("database connection lost, reconnecting: %s", reason(exc))
        self._down_since = time.monotonic()
        if self.conn is not None:
            self.conn.close()
        self.conn = None

    # -- one round over the tenants --------------------------------------------------------

    def _round(self, conn: psycopg.Connection[Any]) -> bool:
        """Read and handle one batch per served tenant; whether any chunk came."""
        self._relist(conn)
        busy = False
        for tenant in self.tenants:
            if self.stopping.is_set():
                break
            if tenant in self._skipped:
                continue
            chunks = self._read(conn, tenant)
            if chunks:
                busy = True
                self._handle(conn, tenant, chunks)
        self._housekeeping(conn)
        return busy

    def _relist(self, conn: psycopg.Connection[Any]) -> None:
        now = time.monotonic()
        if now < self._due["relist"]:
            return
        self._due["relist"] = now + RELIST_SECONDS
        before = set(self.tenants)
        self.tenants = list(self.options.tenants) or jobs.consumable_tenants(conn)
        self._skipped.clear()
        if set(self.tenants) != before:
            log.info("serving tenants: %s", ", ".join(self.tenants) or "none yet")
            if self.options.metrics_port:
                metrics.observe([], gone=before - set(self.tenants))

    def _read(self, conn: psycopg.Connection[Any], tenant: str) -> list[jobs.Chunk]:
        try:
            return jobs.read(
                conn,
                tenant,
                visibility_timeout=self.settings.job_visibility_timeout,
                limit=self.options.batch,
            )
        except psycopg.Error as exc:
            if _broken(conn, exc):
                raise
            # Not granted, or removed meanwhile: leave it until the next listing.
            log.warning("tenant %s skipped until relisted: %s", tenant, reason(exc))
        self._skipped.add(tenant)
        return []

    def _handle(self, conn: psycopg.Connection[Any], tenant: str, chunks: list[jobs.Chunk]) -> None:
        try:
            served = self.models.get(tenant)
        except ModelUnavailableError as exc:
            log.warning("tenant %s: %s; %d chunk(s) wait", tenant, exc, len(chunks))
            wait = min(self.settings.job_visibility_timeout, MODEL_WAIT_SECONDS)
            for chunk in chunks:
                jobs.retry_later(conn, chunk, reason(exc), delay=wait)
            metrics.count(tenant, "retried", len(chunks))
            return
        flag = self.settings.predict_out_of_range == "flag"
        record = served.unbounded_record if flag else served.record
        scored, failed = score(served, chunks, record=record, flag_range=flag)
        for done in scored:
            try:
                job = jobs.complete(
                    conn,
                    done.chunk,
                    done.answers,
                    done.predictions,
                    model_name=served.name,
                    model_version=served.version,
                )
            except psycopg.Error as exc:
                if _broken(conn, exc):
                    raise
                failed.append(Failed(done.chunk, reason(exc)))  # e.g. a chunk of no job
                continue
            metrics.count(tenant, "done")
            if job is not None and job.callback_url:
                self._due["callbacks"] = 0.0  # claim it in this round's housekeeping
        for failure in failed:
            self._fail(conn, failure)

    def _fail(self, conn: psycopg.Connection[Any], failure: Failed) -> None:
        chunk = failure.chunk
        if chunk.read_ct >= self.settings.job_max_tries:
            log.warning(
                "job %s chunk %d dead-lettered after %d tries: %s",
                chunk.job_id,
                chunk.chunk,
                chunk.read_ct,
                failure.reason,
            )
            job = jobs.dead_letter(conn, chunk, failure.reason)
            metrics.count(chunk.tenant_id, "dead")
            if job is not None and job.callback_url:
                self._due["callbacks"] = 0.0
        else:
            jobs.retry_later(conn, chunk, failure.reason, delay=backoff(chunk.read_ct))
            metrics.count(chunk.tenant_id, "retried")

    def _housekeeping(self, conn: psycopg.Connection[Any]) -> None:
        """Refresh the queue gauges, send due callbacks, purge jobs past retention, when due."""
        now = time.monotonic()
        served = [t for t in self.tenants if t not in self._skipped]
        if self.options.metrics_port and now >= self._due["depths"]:
            self._due["depths"] = now + DEPTH_SECONDS
            metrics.observe(jobs.depths(conn, served))
        if served and now >= self._due["callbacks"]:
            self._due["callbacks"] = now + CALLBACK_SECONDS
            for job in jobs.claim_callbacks(conn, served, lease=CALLBACK_LEASE):
                self.callbacks.send(job)
        if served and now >= self._due["purge"]:
            self._due["purge"] = now + PURGE_SECONDS
            removed = jobs.purge(conn, served, timedelta(hours=self.settings.job_retention_hours))
            if removed:
                log.info(
                    "purged %d job(s) ended over %g h ago",
                    removed,
                    self.settings.job_retention_hours,
                )
