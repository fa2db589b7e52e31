"""Inference workers as real processes on a real PostgreSQL (pgmq) and MLflow server.

Jobs are submitted through the store as the predictor role (`jobs.submit`), workers are
`python -m services.worker` processes logging in as `mlops_worker`: two serve the tenants
a, b and c (one for the whole module, one until the kill test SIGKILLs it), others serve the
tenant `idle` and exit when idle. The database is a cluster of the module's own, restarted
under the workers by one test.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import httpx
import psycopg
import pytest
from psycopg import sql

from common import callbacks
from common.localpg import LocalPostgres
from common.store import connect, jobs, migrate, roles, tenants
from tests.integration.serving import register_copies
from tests.integration.test_predictor import RECORD
from tests.servers import (
    STARTUP_TIMEOUT,
    VENV_BIN,
    HttpServer,
    Server,
    clean_env,
    free_port,
    http_ok,
    log_tail,
    throwaway_cluster,
)
from tests.workspace import ROOT, Workspace

pytestmark = pytest.mark.integration

SERVED = "churn-worker"
TENANTS = ("a", "b", "c")
IDLE_TENANT = "idle"
"""Served by no long-running worker: only the idle-exit test's workers read it."""
LATE_TENANT = "late"
LATE_MODEL = "churn-late"
"""Served to LATE_TENANT by the `late` worker; registered only during the test."""
VISIBILITY = 5
DRAIN_TIMEOUT = 180
"""Seconds the surviving worker may take to finish the rest after a kill or a restart: the
killed worker's chunks come back after VISIBILITY; the rest is throughput, which the suite's
other workers can cut several-fold (the time taken is printed; benchmarks/async_jobs.py is
where speed is judged)."""
MAX_TRIES = 3
SECRET = "callback-secret"


@dataclass(frozen=True)
class Stack:
    pg: LocalPostgres
    admin: str
    predictor: str
    worker: str
    env: dict[str, str]
    home: Path


@pytest.fixture(scope="module")
def stack(
    mlflow_server: HttpServer, pipeline: Workspace, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """Its own cluster (a test restarts it), tenants a, b, c and idle, the model registered."""
    register_copies(mlflow_server.url, SERVED, versions=1)
    home = tmp_path_factory.mktemp("workers")
    with throwaway_cluster("workers", "jobs") as pg:
        admin = pg.url("jobs")
        migrate(admin)
        for role in roles.SERVICE_ROLES:
            roles.enable_login(admin, role)
        for tenant in (*TENANTS, IDLE_TENANT, LATE_TENANT):
            tenants.add_tenant(admin, tenant)
        worker = roles.role_url(admin, roles.WORKER)
        env = {
            "DATABASE_URL": worker,
            "MLFLOW_TRACKING_URI": mlflow_server.url,
            "MODEL_NAME": SERVED,
            "MODEL_POLL_SECONDS": "5",
            "MLOPS_HOME": str(home / ".mlops"),
            "JOB_VISIBILITY_TIMEOUT": str(VISIBILITY),
            "JOB_MAX_TRIES": str(MAX_TRIES),
            "JOB_CALLBACK_HOSTS": "127.0.0.1",
            "JOB_CALLBACK_SECRET": SECRET,
        }
        yield Stack(pg, admin, roles.role_url(admin, roles.PREDICTOR), worker, env, home)


def worker_cmd(*args: str) -> list[str]:
    return [str(VENV_BIN / "python"), "-m", "services.worker", *args]


def worker_server(stack: Stack, name: str, *args: str, **env: str) -> tuple[Server, str]:
    """A worker with /metrics (up once it tried to load its model); (server, metrics URL)."""
    port = free_port()
    server = Server(
        name,
        worker_cmd("--metrics-port", str(port), "--poll", "0.1", *args),
        log_path=stack.home / f"{name}.log",
        healthy=http_ok(f"http://127.0.0.1:{port}/metrics"),
        env=clean_env(**(stack.env | env)),
        cwd=ROOT,
    )
    return server, f"http://127.0.0.1:{port}/metrics"


@dataclass(frozen=True)
class Workers:
    steady: Server
    metrics: str
    partner: Server
    late: Server
    first_idle: subprocess.Popen[str]


@pytest.fixture(scope="module")
def workers(stack: Stack) -> Iterator[Workers]:
    """Started together, as each start imports MLflow and loads the model (~15 s on two busy
    cores): `steady` serves a, b and c for the whole module, `partner` too until the kill
    test SIGKILLs it, and `first_idle`, serving only IDLE_TENANT, exits once idle."""
    served = [a for t in TENANTS for a in ("--tenant", t)]
    first_idle = subprocess.Popen(
        worker_cmd("--tenant", IDLE_TENANT, "--idle-exit", "1", "--poll", "0.1"),
        env=clean_env(**stack.env),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    steady, url = worker_server(stack, "steady", *served)
    partner, _ = worker_server(stack, "partner", *served)
    late, _ = worker_server(
        stack, "late", "--tenant", LATE_TENANT, MODEL_NAME=LATE_MODEL, JOB_MAX_TRIES="1"
    )
    try:
        with ThreadPoolExecutor(3) as pool:
            for started in [pool.submit(s.start, STARTUP_TIMEOUT) for s in (steady, partner, late)]:
                started.result()
        yield Workers(steady, url, partner, late, first_idle)
        assert steady.pid is not None
        os.kill(steady.pid, signal.SIGTERM)  # finishes the batch in hand, exits 0
        asked = time.monotonic()
        wait_until(
            lambda: "exits: stopped" in steady.log_path.read_text(errors="replace"),
            60,
            "the steady worker's exit on SIGTERM",
            steady.log_path,
        )
        print(f"steady worker stopped {time.monotonic() - asked:.1f} s after SIGTERM")
    finally:
        for server in (steady, partner, late):
            server.stop()
        if first_idle.poll() is None:
            first_idle.kill()
        first_idle.communicate()


def records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    return [{**RECORD, "tenure_months": (seed + i) % 60} for i in range(n)]


def submit(
    stack: Stack, tenant: str, rows: list[dict[str, Any]], chunk_records: int = 4, **kw: Any
) -> jobs.Job:
    with connect(stack.predictor) as conn:
        job, _ = jobs.submit(conn, tenant, rows, chunk_records=chunk_records, **kw)
    return job


def wait_until(check: Callable[[], bool], timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout} s\n{log_tail(log)}")
        time.sleep(0.1)


def tally(stack: Stack, job_list: list[jobs.Job]) -> dict[str, int]:
    """Over these jobs: done and failed jobs, result rows, logged predictions (distinct too)."""
    ids = [j.id for j in job_list]
    rids = [jobs.request_id(j.id, i) for j in job_list for i in range(j.records)]
    with connect(stack.admin) as conn:
        statuses = dict(
            conn.execute(
                "SELECT status, count(*) FROM jobs WHERE id = ANY(%s::uuid[]) GROUP BY status",
                [ids],
            ).fetchall()
        )
        results = conn.execute(
            "SELECT count(*) FROM job_results WHERE job_id = ANY(%s::uuid[])", [ids]
        ).fetchone()
        logged = conn.execute(
            "SELECT count(*), count(DISTINCT request_id) FROM predictions"
            " WHERE request_id = ANY(%s::uuid[])",
            [rids],
        ).fetchone()
    assert results is not None
    assert logged is not None
    return {
        "done": statuses.get("done", 0),
        "failed": statuses.get("failed", 0),
        "results": results[0],
        "predictions": logged[0],
        "distinct_predictions": logged[1],
    }


def expected(job_list: list[jobs.Job]) -> dict[str, int]:
    records = sum(j.records for j in job_list)
    return {
        "done": len(job_list),
        "failed": 0,
        "results": sum(j.chunks for j in job_list),
        "predictions": records,
        "distinct_predictions": records,
    }


def scored_chunks(stack: Stack, job_list: list[jobs.Job]) -> int:
    with connect(stack.admin) as conn:
        row = conn.execute(
            "SELECT count(*) FROM job_results WHERE job_id = ANY(%s::uuid[])",
            [[j.id for j in job_list]],
        ).fetchone()
    assert row is not None
    return int(row[0])


def all_done(stack: Stack, job_list: list[jobs.Job]) -> bool:
    with connect(stack.admin) as conn:
        row = conn.execute(
            "SELECT count(*) FROM jobs WHERE id = ANY(%s::uuid[]) AND status = 'done'",
            [[j.id for j in job_list]],
        ).fetchone()
    return row == (len(job_list),)


def samples(url: str) -> dict[str, float]:
    """A /metrics page as {'name{labels}': value}."""
    lines = httpx.get(url).text.splitlines()
    return {
        name: float(value)
        for name, _, value in (line.rpartition(" ") for line in lines if line[:1] != "#")
    }


def done_by(metrics_url: str) -> float:
    """The chunks a worker has written, over all tenants (its /metrics)."""
    return sum(
        value
        for name, value in samples(metrics_url).items()
        if name.startswith("mlops_job_chunks_total{") and 'outcome="done"' in name
    )


def test_every_job_completes_once_when_a_worker_is_killed_mid_run(
    stack: Stack, workers: Workers
) -> None:
    """1,000 jobs over 3 tenants, 2 workers; one is SIGKILLed while holding chunks."""
    submitted: list[jobs.Job] = []
    steady_before = done_by(workers.metrics)

    def produce() -> None:
        with connect(stack.predictor) as conn:
            for i in range(1000):
                rows = records(1 + i % 5, seed=i)  # 1 chunk, or 2 for 5 records
                job, _ = jobs.submit(conn, TENANTS[i % 3], rows, chunk_records=4)
                submitted.append(job)

    producer = threading.Thread(target=produce)
    producer.start()
    wait_until(
        lambda: scored_chunks(stack, list(submitted)) >= 400 or not producer.is_alive(),
        60,
        "400 chunks scored",
        workers.partner.log_path,
    )
    before = scored_chunks(stack, list(submitted))
    assert workers.partner.pid is not None
    os.kill(workers.partner.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    producer.join(60)
    assert len(submitted) == 1000
    want = expected(submitted)
    assert before < want["results"]  # the kill came mid-run
    wait_until(
        lambda: all_done(stack, submitted),
        DRAIN_TIMEOUT,
        "all 1,000 jobs done after the kill",
        workers.steady.log_path,
    )
    finished = time.monotonic() - killed_at
    assert tally(stack, submitted) == want  # exactly one result and one log row per record
    assert done_by(workers.metrics) - steady_before < want["results"]  # both workers scored
    print(f"1,000 jobs ({want['results']} chunks) done {finished:.1f} s after the kill")


def test_no_accepted_job_is_lost_or_duplicated_when_postgres_restarts(
    stack: Stack, workers: Workers
) -> None:
    accepted: dict[int, jobs.Job] = {}
    total = 300

    def produce() -> None:
        """Submit each job until accepted; an idempotency key makes a retry the same job."""
        i = 0
        while i < total:
            try:
                with connect(stack.predictor) as conn:
                    while i < total:
                        rows = records(1 + i % 5, seed=i)
                        key = f"restart-{i}"
                        accepted[i], _ = jobs.submit(
                            conn, TENANTS[i % 3], rows, chunk_records=2, idempotency_key=key
                        )
                        i += 1
                        time.sleep(0.005)
            except psycopg.OperationalError:
                time.sleep(0.2)

    producer = threading.Thread(target=produce)
    producer.start()
    wait_until(
        lambda: scored_chunks(stack, list(accepted.values())) >= 100,
        60,
        "100 chunks scored",
        workers.steady.log_path,
    )
    stack.pg.restart()
    producer.join(120)
    job_list = list(accepted.values())
    assert len(job_list) == total
    wait_until(
        lambda: all_done(stack, job_list),
        DRAIN_TIMEOUT,
        "every accepted job done after the restart",
        workers.steady.log_path,
    )
    assert tally(stack, job_list) == expected(job_list)
    assert "database connection lost" in workers.steady.log_path.read_text(errors="replace")


def test_a_poison_chunk_is_dead_lettered_with_its_reason_and_fails_only_its_job(
    stack: Stack, workers: Workers
) -> None:
    good = submit(stack, "b", records(5))
    poison = {**RECORD, "tenure_months": "a lot"}
    # Straight into the queue: the store checks nothing (POST /jobs validates first).
    bad = submit(stack, "b", [*records(2), poison], chunk_records=2)
    after = submit(stack, "b", records(3))
    with connect(stack.predictor) as conn:

        def ended() -> bool:
            return all(
                (j := jobs.get(conn, "b", job.id)) is not None and j.ended
                for job in (good, bad, after)
            )

        wait_until(ended, 30, "the three jobs ended", workers.steady.log_path)
        failed = jobs.get(conn, "b", bad.id)
        states = [(j.status if (j := jobs.get(conn, "b", x.id)) else None) for x in (good, after)]
    assert failed is not None
    assert failed.status == "failed"
    assert "tenure_months" in (failed.error or "")
    assert states == ["done", "done"]
    with connect(stack.admin) as conn:
        letters = conn.execute(
            "SELECT message FROM pgmq.read(%s, 30, 10)", [jobs.queue_name(jobs.DEAD, "b")]
        ).fetchall()
    (letter,) = [m[0] for m in letters if m[0]["job_id"] == bad.id]
    assert letter["read_ct"] == MAX_TRIES
    assert letter["reason"].startswith("ValidationError")
    assert "tenure_months" in letter["reason"]
    assert tally(stack, [bad])["results"] == 1  # its good chunk was still scored


def test_an_idle_worker_exits_and_a_new_one_picks_up_the_next_job(
    stack: Stack, workers: Workers
) -> None:
    _, said = workers.first_idle.communicate(timeout=120)
    assert workers.first_idle.returncode == 0, said
    assert "exits: idle" in said

    job = submit(stack, IDLE_TENANT, records(3))
    with connect(stack.predictor) as conn:
        waiting = jobs.get(conn, IDLE_TENANT, job.id)
    assert waiting is not None
    assert waiting.status == "queued"  # nobody serves it now
    # Without --tenant: every tenant the role may consume, IDLE_TENANT among them.
    second = subprocess.run(
        worker_cmd("--idle-exit", "1", "--poll", "0.1"),
        check=False,
        env=clean_env(**stack.env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode == 0, second.stderr
    assert f"serving tenants: a, b, c, default, {IDLE_TENANT}, {LATE_TENANT}" in second.stderr
    with connect(stack.predictor) as conn:
        done = jobs.get(conn, IDLE_TENANT, job.id)
        answers = jobs.results(conn, IDLE_TENANT, job.id, offset=0, limit=10)
    assert done is not None
    assert done.status == "done"
    assert [a["request_id"] for a in answers] == [jobs.request_id(job.id, i) for i in range(3)]
    assert {a["model_name"] for a in answers} == {SERVED}
    assert set(answers[0]) == {
        "request_id",
        "predicted_class",
        "probabilities",
        "model_name",
        "model_version",
        "variant",  # always the champion: workers do not load variants
    }
    assert {a["variant"] for a in answers} == {"champion"}


def test_a_worker_serves_the_tenants_whose_request_queue_its_role_may_consume(
    stack: Stack,
) -> None:
    queue = sql.Identifier("q_" + jobs.queue_name(jobs.REQUEST, "default"))
    with connect(stack.worker) as conn:
        everyone = ["a", "b", "c", "default", IDLE_TENANT, LATE_TENANT]
        assert jobs.consumable_tenants(conn) == everyone
    with connect(stack.admin) as admin:
        admin.execute(sql.SQL("REVOKE UPDATE, DELETE ON pgmq.{} FROM mlops_worker").format(queue))
        try:
            with connect(stack.worker) as conn:
                assert jobs.consumable_tenants(conn) == [t for t in everyone if t != "default"]
        finally:
            admin.execute(sql.SQL("GRANT UPDATE, DELETE ON pgmq.{} TO mlops_worker").format(queue))


def test_chunks_wait_for_a_model_the_registry_cannot_give_yet_and_are_not_dead_lettered(
    stack: Stack, workers: Workers, mlflow_server: HttpServer
) -> None:
    job = submit(stack, LATE_TENANT, records(4), chunk_records=2)
    with connect(stack.predictor) as conn:

        def waiting() -> bool:
            j = jobs.get(conn, LATE_TENANT, job.id)
            return j is not None and "no model to serve now" in (j.last_error or "")

        wait_until(waiting, 120, "the chunks told to wait", workers.late.log_path)
        register_copies(mlflow_server.url, LATE_MODEL, versions=1)
        wait_until(
            lambda: (j := jobs.get(conn, LATE_TENANT, job.id)) is not None and j.ended,
            120,
            "the job ended once its model was registered",
            workers.late.log_path,
        )
        done = jobs.get(conn, LATE_TENANT, job.id)
        answers = jobs.results(conn, LATE_TENANT, job.id, offset=0, limit=10)
    assert done is not None
    assert done.status == "done"  # JOB_MAX_TRIES is 1: a poison chunk would have failed it
    assert {(a["model_name"], a["model_version"]) for a in answers} == {(LATE_MODEL, "1")}


class Receiver(http.server.BaseHTTPRequestHandler):
    """Keeps every POST it gets (outside the system: a customer's endpoint)."""

    got: ClassVar[list[tuple[dict[str, str], bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.got.append(({k.lower(): v for k, v in self.headers.items()}, body))
        # /flaky fails its first POST, as a receiver that is down for a moment
        first = sum(1 for h, _ in self.got if h.get("x-path") == self.path) == 0
        self.got[-1][0]["x-path"] = self.path
        self.send_response(500 if self.path == "/flaky" and first else 204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def receiving(path: str) -> Iterator[str]:
    """A receiver's URL at `path` while the block runs; what it got in Receiver.got."""
    Receiver.got.clear()
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{receiver.server_port}{path}"
    finally:
        receiver.shutdown()


def callback_ended(
    stack: Stack, workers: Workers, url: str, n: int, ended: Callable[[jobs.Job], bool]
) -> jobs.Job:
    """A job of `n` records with `url` as its callback, once `ended` says its callback is."""
    job = submit(stack, "c", records(n), callback_url=url)
    with connect(stack.predictor) as conn:
        wait_until(
            lambda: (j := jobs.get(conn, "c", job.id)) is not None and ended(j),
            120,
            "the callback recorded",
            workers.steady.log_path,
        )
        after = jobs.get(conn, "c", job.id)
    assert after is not None
    return after


def test_a_job_with_a_callback_url_gets_one_signed_post(stack: Stack, workers: Workers) -> None:
    with receiving("/hook") as url:
        after = callback_ended(stack, workers, url, 6, lambda j: j.callback_status is not None)
    assert after.callback_status == "delivered"
    (headers, body), *more = Receiver.got
    assert more == []
    assert callbacks.verify(
        body,
        SECRET,
        headers[callbacks.TIMESTAMP_HEADER.lower()],
        headers[callbacks.SIGNATURE_HEADER.lower()],
    )
    assert json.loads(body) == after.summary()


def test_a_callback_the_receiver_failed_is_sent_again_until_delivered(
    stack: Stack, workers: Workers
) -> None:
    with receiving("/flaky") as url:  # its first POST fails
        after = callback_ended(stack, workers, url, 3, lambda j: j.callback_status == "delivered")
    assert after.callback_attempts == 2
    assert [json.loads(body)["job_id"] for _, body in Receiver.got] == [after.id, after.id]


def test_metrics_show_the_queue_depth_of_a_tenant_with_queued_chunks(
    stack: Stack, workers: Workers
) -> None:
    queue = sql.Identifier("q_" + jobs.queue_name(jobs.REQUEST, "a"))
    with connect(stack.admin) as conn:
        with conn.transaction():  # queued and held at once, as a slow worker would hold them
            job, _ = jobs.submit(conn, "a", records(10), chunk_records=2)
            conn.execute(
                sql.SQL(
                    "UPDATE pgmq.{} SET vt = now() + interval '60 s' WHERE message->>'job' = %s"
                ).format(queue),
                [job.id],
            )
        depth = 'mlops_job_queue_depth{tenant="a"}'
        wait_until(
            lambda: samples(workers.metrics).get(depth, 0) >= job.chunks,
            60,
            "tenant a's queue depth at /metrics",
            workers.steady.log_path,
        )
        shown = samples(workers.metrics)
        conn.execute(  # hand them back: the workers finish the job
            sql.SQL("UPDATE pgmq.{} SET vt = now() WHERE message->>'job' = %s").format(queue),
            [job.id],
        )
    assert shown['mlops_job_queue_oldest_age_seconds{tenant="a"}'] >= 0
    assert "# TYPE mlops_job_chunks_total counter" in httpx.get(workers.metrics).text
    with connect(stack.predictor) as conn:
        wait_until(
            lambda: (j := jobs.get(conn, "a", job.id)) is not None and j.status == "done",
            60,
            "the held job done once handed back",
            workers.steady.log_path,
        )
