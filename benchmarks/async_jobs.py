"""Asynchronous jobs (issue 14): the queue alone, then jobs end to end over HTTP, in one run.

1. the queue alone: the project's request queue (`jobs.queue_name(REQUEST, tenant)`, pgmq,
   migrations 0006-0007) on a PostgreSQL of its own (`LocalPostgres`, fsync on as in
   production), messages sent with one `pgmq.send` each, pipelined (as `jobs.submit` does)
   or with one `pgmq.send_batch`, read with `pgmq.read` and deleted with `pgmq.delete` in
   batches of 32, messages/s; once with 1-record messages and once with full chunks
   (JOB_CHUNK_RECORDS records), the message a job's records become
2. end to end over HTTP: jobs submitted to a real `bentoml serve` predictor (`POST /jobs`,
   then `GET /jobs/{id}` polled until done) and scored by 1, then 2 worker processes
   (`python -m services.worker`), records/s from the first submission to the last job
   done, against the synchronous `/predict` path with 100-record requests (32 clients) on
   the same server in the same run; jobs are big enough (several chunks each) that scoring
   dominates, so 2 workers should give at least 1.6x one; also the rate once the last job
   is accepted (the workers and PostgreSQL alone) and the workers' CPU per record and cores
   used, which tell a lack of cores (other processes on the machine) from a bottleneck
3. latency at a fixed rate: small jobs submitted open-loop at 100 jobs/s (each sent at its
   scheduled time, none waiting for an earlier answer) to 2 workers: submission p50/p95
   (the POST's answer) and completion p50/p95 (scheduled send to the job's `finished_at`)

Needs a champion in the configured registry (`make demo`, or `dvc repro register`). The
database is a throwaway cluster on a free port: the demo's embedded one is not touched.
Run: `make bench-jobs` (`--quick` for a short smoke run, `--queue-only` for part 1 alone).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
from psycopg.types.json import Jsonb

from benchmarks.serving import throughput
from common import registry
from common.localpg import LocalPostgres
from common.settings import Settings, get_settings
from common.store import connect, jobs, migrate, roles, tenants
from common.store.rows import dumps
from services.predictor.demo import sample_records
from services.predictor.launch import serving
from tests.servers import free_port

TENANT = "bench-jobs"
BATCH = 32
"""Messages per send_batch, read and delete in the queue-alone figures."""
WORKER_BATCH = 4
"""Chunks a worker reads at a time: small beside a run's chunks, so two workers share the
last ones instead of one holding 32 while the other idles (the worker's default is 32)."""
SUBMITTERS = 4
"""Clients submitting the throughput figures' jobs at once: a burst of big jobs mostly
waits for validation, which the predictor's 2 BentoML workers share."""
RATE = 100.0
"""Jobs per second of the fixed-rate figure (issue 14's target)."""


@dataclass(frozen=True)
class Sizes:
    queue_messages: int
    job_records: int
    """Records per job of the throughput figures: several chunks, so scoring dominates."""
    jobs: int
    rate_seconds: float
    small_job_records: int
    """Records per job at the fixed rate: a typical small job, one chunk."""


FULL = Sizes(
    queue_messages=20_000, job_records=5_000, jobs=24, rate_seconds=20, small_job_records=20
)
QUICK = Sizes(queue_messages=2_000, job_records=2_000, jobs=6, rate_seconds=5, small_job_records=20)


@contextlib.contextmanager
def database() -> Iterator[str]:
    """A PostgreSQL of its own on a free port (fsync on), migrated, with the bench tenant
    (and so its queues); the owner's URL. Removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="mlops-bench-jobs-"))
    pg = LocalPostgres(base, free_port())
    try:
        pg.start()
        pg.create_database("bench")
        url = pg.url("bench")
        migrate(url)
        tenants.add_tenant(url, TENANT)
        yield url
    finally:
        pg.destroy()


# -- 1. the queue alone --------------------------------------------------------------------------


def queue_alone(
    url: str, message: dict[str, Any], n: int, *, send_batch: bool = True
) -> tuple[float, float, float]:
    """(send, read + delete, round trip) messages/s of `n` copies of `message` through the
    bench tenant's request queue, BATCH at a time, a transaction each: sent with one
    `pgmq.send_batch`, or else with BATCH `pgmq.send` (executemany, as `jobs.submit`)."""
    queue = jobs.queue_name(jobs.REQUEST, TENANT)
    body = [Jsonb(message, dumps=dumps)] * BATCH
    with connect(url) as conn:
        conn.execute("SELECT pgmq.purge_queue(%s)", [queue])
        start = time.perf_counter()
        for _ in range(n // BATCH):
            with conn.transaction(), conn.cursor() as cur:
                if send_batch:
                    cur.execute("SELECT pgmq.send_batch(%s, %s::jsonb[])", [queue, body])
                else:
                    cur.executemany("SELECT pgmq.send(%s, %s)", [[queue, m] for m in body])
        sent = time.perf_counter() - start
        start = time.perf_counter()
        got = 0
        while True:
            rows = conn.execute(  # the messages too: a worker reads them
                "SELECT msg_id, message FROM pgmq.read(%s, %s, %s)", [queue, 30, BATCH]
            ).fetchall()
            ids = [msg_id for msg_id, _ in rows]
            if not ids:
                break
            conn.execute("SELECT pgmq.delete(%s, %s::bigint[])", [queue, ids])
            got += len(ids)
        drained = time.perf_counter() - start
    total = n // BATCH * BATCH
    assert got == total, f"read {got} of {total} messages"
    return total / sent, total / drained, total / (sent + drained)


# -- 2 and 3. over HTTP --------------------------------------------------------------------------


@contextlib.contextmanager
def workers(settings: Settings, worker_url: str, count: int) -> Iterator[list[int]]:
    """`count` worker processes (`python -m services.worker`), stopped with SIGTERM after."""
    env = {
        **os.environ,
        "DATABASE_URL": worker_url,
        "OMP_NUM_THREADS": "1",
        "MLFLOW_TRACKING_URI": settings.tracking_uri,
    }
    cmd = [sys.executable, "-m", "services.worker", "--tenant", TENANT, "--poll", "0.05"]
    cmd += ["--batch", str(WORKER_BATCH)]
    procs = [subprocess.Popen(cmd, env=env, start_new_session=True) for _ in range(count)]
    try:
        yield [p.pid for p in procs]
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def submit(client: httpx.AsyncClient, records: Sequence[dict[str, Any]]) -> str:
    resp = await client.post("/jobs", json={"records": list(records)})
    if resp.status_code != 202:
        raise RuntimeError(f"POST /jobs: HTTP {resp.status_code} {resp.text[:300]}")
    return str(resp.json()["job_id"])


async def wait_done(client: httpx.AsyncClient, job_id: str, every: float = 0.1) -> dict[str, Any]:
    """GET /jobs/{id} (its first page of results) until the job ended; a failed job raises."""
    while True:
        resp = await client.get(f"/jobs/{job_id}", params={"limit": 1})
        resp.raise_for_status()
        job: dict[str, Any] = resp.json()
        if job["status"] == "failed":
            raise RuntimeError(f"job {job_id} failed: {job['error']}")
        if job["status"] == "done":
            return job
        await asyncio.sleep(every)


@dataclass(frozen=True)
class Run:
    """One throughput figure: `n` jobs submitted by SUBMITTERS clients, polled to done."""

    records: int
    seconds: float
    """From the first submission to the last job seen done."""
    submitting: float
    """From the first submission to the last one accepted."""
    drained: int
    """Records scored after the last submission: the workers alone (and PostgreSQL)."""

    @property
    def rate(self) -> float:
        return self.records / self.seconds

    @property
    def drain_rate(self) -> float:
        return self.drained / (self.seconds - self.submitting)


def _scored(url: str, ids: Sequence[str]) -> int:
    """Records of these jobs scored so far (read as the owner)."""
    with connect(url) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(jsonb_array_length(answers)), 0) FROM job_results"
            " WHERE job_id = ANY(%s::uuid[])",
            [list(ids)],
        ).fetchone()
    return int(row[0]) if row else 0


async def jobs_rate(base: str, key: str, records: list[dict[str, Any]], n: int, admin: str) -> Run:
    """`n` jobs of `records` submitted by SUBMITTERS clients, each polled until done."""
    headers = {"authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=120) as client:
        gate = asyncio.Semaphore(SUBMITTERS)

        async def one() -> str:
            async with gate:
                return await submit(client, records)

        start = time.perf_counter()
        ids = await asyncio.gather(*(one() for _ in range(n)))
        submitting = time.perf_counter() - start
        before = _scored(admin, ids)
        await asyncio.gather(*(wait_done(client, i, every=0.25) for i in ids))
        seconds = time.perf_counter() - start
    return Run(n * len(records), seconds, submitting, n * len(records) - before)


async def fixed_rate(
    base: str, key: str, records: list[dict[str, Any]], seconds: float
) -> tuple[list[float], dict[str, float], list[str]]:
    """Submit a job of `records` every 1/RATE s for `seconds`, open-loop: (each accepted
    POST's seconds, each job id's scheduled send time as a wall-clock timestamp, why each
    refused POST was)."""
    headers = {"authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    submitted: list[float] = []
    scheduled: dict[str, float] = {}
    refused: list[str] = []
    async with httpx.AsyncClient(
        base_url=base, headers=headers, timeout=60, limits=limits
    ) as client:

        async def one(at_wall: float) -> None:
            start = time.perf_counter()
            try:
                job_id = await submit(client, records)
            except (RuntimeError, httpx.HTTPError) as exc:
                refused.append(str(exc)[:120])
                return
            submitted.append(time.perf_counter() - start)
            scheduled[job_id] = at_wall

        loop = asyncio.get_running_loop()
        t0, wall0 = loop.time() + 0.2, time.time() + 0.2
        tasks = []
        for i in range(int(seconds * RATE)):
            delay = t0 + i / RATE - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(wall0 + i / RATE)))
        await asyncio.gather(*tasks)
    return submitted, scheduled, refused


def finished(url: str, ids: Sequence[str], timeout: float = 120) -> dict[str, datetime]:
    """Each job's `finished_at` (read as the owner), once all are done."""
    deadline = time.monotonic() + timeout
    with connect(url) as conn:
        while True:
            rows = conn.execute(
                "SELECT id::text, status, finished_at FROM jobs WHERE id = ANY(%s::uuid[])",
                [list(ids)],
            ).fetchall()
            if all(status == "done" for _, status, _ in rows) and len(rows) == len(ids):
                return {i: at for i, _, at in rows}
            if time.monotonic() > deadline:
                raise RuntimeError(f"{sum(s != 'done' for _, s, _ in rows)} jobs not done")
            time.sleep(0.5)


def _cpu_seconds(pids: Sequence[int]) -> float:
    """CPU seconds (user + system) the processes used so far."""
    total = 0.0
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


def _p(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(len(ordered) * q) - 1))]


def over_http(settings: Settings, admin: str, sizes: Sizes) -> dict[str, Any]:
    roles.enable_login(admin, roles.PREDICTOR)
    roles.enable_login(admin, roles.WORKER)
    served = settings.model_copy(update={"database_url": roles.role_url(admin, roles.PREDICTOR)})
    worker_url = roles.role_url(admin, roles.WORKER)
    key = tenants.create_key(admin, TENANT, ("predict",)).secret
    sample, _ = sample_records(1000)
    records = (sample * math.ceil(sizes.job_records / len(sample)))[: sizes.job_records]
    small = sample[: sizes.small_job_records]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    out: dict[str, Any] = {"chunk": settings.job_chunk_records}
    with serving(served, port):
        batch = {"records": sample[:100]}
        headers = {"authorization": f"Bearer {key}"}
        throughput(f"{base}/predict", batch, 100, headers)  # warm-up
        out["sync"] = throughput(f"{base}/predict", batch, 100, headers)
        for count in (1, 2):
            with workers(settings, worker_url, count) as pids:
                warm = records[: settings.job_chunk_records * 2 * count]
                asyncio.run(jobs_rate(base, key, warm, 2, admin))  # every worker's model loaded
                cpu = _cpu_seconds(pids)
                run = asyncio.run(jobs_rate(base, key, records, sizes.jobs, admin))
                out[f"jobs_{count}"] = run
                out[f"cpu_{count}"] = _cpu_seconds(pids) - cpu
                if count == 2:
                    posts, scheduled, refused = asyncio.run(
                        fixed_rate(base, key, small, sizes.rate_seconds)
                    )
                    out["refused"] = refused
                    done = finished(admin, list(scheduled))
                    waits = [done[i].timestamp() - at for i, at in scheduled.items()]
                    out["submit"] = (_p(posts, 0.5), _p(posts, 0.95))
                    out["complete"] = (_p(waits, 0.5), _p(waits, 0.95))
                    out["rate_jobs"] = len(scheduled)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--queue-only", action="store_true", help="part 1 alone (no model)")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    settings = get_settings()
    if not args.queue_only:
        client = registry.connect(settings)
        if registry.version_by_alias(client, settings.model_name, settings.model_alias) is None:
            sys.exit("no champion: run `make demo` (or `dvc repro register`) first")
    sample, _ = sample_records(settings.job_chunk_records)
    chunk = {"job": "0" * 32, "chunk": 0, "first": 0, "records": sample}
    tiny = {**chunk, "records": sample[:1]}
    print(
        f"async jobs benchmark: {psutil.cpu_count()} cores (load average "
        f"{os.getloadavg()[0]:.1f} at the start); pgmq {BATCH} messages a call; "
        f"chunks of {settings.job_chunk_records:,} records"
    )
    with database() as url:
        print(f"{'queue alone (msg/s)':44} {'send':>10} {'read+delete':>12} {'round trip':>11}")
        chunks = max(BATCH * 2, sizes.queue_messages // 100)
        for name, message, n, batched in (
            ("1-record messages, send_batch", tiny, sizes.queue_messages, True),
            ("1-record messages, send x32", tiny, sizes.queue_messages, False),
            (f"{len(sample):,}-record chunks, send_batch", chunk, chunks, True),
            (f"{len(sample):,}-record chunks, send x32", chunk, chunks, False),
        ):
            send, drain, both = queue_alone(url, message, n, send_batch=batched)
            print(f"  {name:42} {send:>10,.0f} {drain:>12,.0f} {both:>11,.0f}")
        if args.queue_only:
            return
        got = over_http(settings, url, sizes)
    sync, failed = got["sync"]
    one: Run = got["jobs_1"]
    two: Run = got["jobs_2"]
    print(f"{'over HTTP (records/s)':44} {'end to end':>10} {'submitting':>12} {'after it':>11}")
    print(
        f"  {'POST /predict, 100 records, 32 clients':42} {sync:>10,.0f}"
        + (f" ({failed} failed)" if failed else "")
    )
    label = f"POST /jobs, {sizes.jobs} x {sizes.job_records:,} records"
    for name, run in ((f"{label}, 1 worker", one), (f"{label}, 2 workers", two)):
        print(f"  {name:42} {run.rate:>10,.0f} {run.submitting:>10.1f} s {run.drain_rate:>11,.0f}")
    for count, run in ((1, one), (2, two)):
        cpu = got[f"cpu_{count}"]
        print(
            f"  {count} worker(s): {cpu / run.records * 1e6:.0f} CPU-ms per 1,000 records, "
            f"{cpu / run.seconds:.2f} cores used of {psutil.cpu_count()}"
        )
    print(
        f"2 workers vs 1: {two.rate / one.rate:.2f}x end to end, "
        f"{two.drain_rate / one.drain_rate:.2f}x once every job is queued (the workers and "
        "PostgreSQL alone; aim: at least 1.6x when scoring dominates)"
    )
    sub, comp, refused = got["submit"], got["complete"], got["refused"]
    print(
        f"{got['rate_jobs']:,} jobs of {sizes.small_job_records} records at {RATE:.0f} jobs/s "
        f"(open loop, 2 workers): submit p50 {sub[0] * 1000:.0f} ms, p95 {sub[1] * 1000:.0f} ms;"
        f" completion p50 {comp[0] * 1000:.0f} ms, p95 {comp[1] * 1000:.0f} ms; "
        f"{len(refused)} refused" + (f" (first: {refused[0]})" if refused else "")
    )
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (other processes share the cores)")


if __name__ == "__main__":
    main()
