"""The demo's asynchronous step: one job per tenant, scored by worker processes.

Each tenant submits a few hundred of its own records with its own key (`POST /jobs`);
then two workers (`python -m services.worker`, started here, `--idle-exit` so that they
end by themselves once the queues are empty) score them, and each job is polled
(`GET /jobs/{id}`) until it ended. Every answer names the model that scored it: a tenant
with a model of its own gets its own, as on `/predict`.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from common.settings import Settings
from common.store import roles

Request = Callable[..., Any]
"""`scripts.loop._request`: (url, body=None, key=None, timeout=...) -> the JSON answer."""

WORKERS = 2
IDLE_EXIT = 5.0
"""Seconds a worker waits with nothing to read before it exits on its own."""


@dataclass(frozen=True)
class JobOutcome:
    """One tenant's job as the demo saw it."""

    tenant: str
    job_id: str
    records: int
    status: str
    models: tuple[str, ...]
    """`name vN` of every model that scored the job's records (one, normally)."""
    scored: int
    """Answers read back: all of `records` when the job is done."""
    seconds: float
    """From the job's creation to its end."""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "done" and self.scored == self.records and len(self.models) == 1

    def line(self) -> str:
        """The line the demo prints for this tenant."""
        if self.ok:
            return (
                f"{self.tenant}: job {self.job_id[:8]}, {self.records:,} records scored by "
                f"{self.models[0]}, done {self.seconds:.1f} s after it was submitted (the "
                "workers' start included)"
            )
        models = ", ".join(self.models) or "no model"
        return (
            f"{self.tenant}: job {self.job_id[:8]} {self.status.upper()} after "
            f"{self.seconds:.1f} s: {self.scored:,} of {self.records:,} records answered "
            f"({models})" + (f": {self.error}" if self.error else "")
        )


def worker_command(tenants: Sequence[str], idle_exit: float = IDLE_EXIT) -> list[str]:
    """The worker's command line, serving exactly the demo's tenants."""
    cmd = [sys.executable, "-m", "services.worker", "--idle-exit", f"{idle_exit:g}"]
    for tenant in tenants:
        cmd += ["--tenant", tenant]
    return cmd


def worker_database_url(settings: Settings, admin_url: str) -> str:
    """What the workers log in with: DATABASE_URL as given (the stack's own), else the
    embedded cluster as `mlops_worker`, so row-level security holds as in production."""
    if settings.database_url:
        return settings.database_url
    roles.enable_login(admin_url, roles.WORKER)  # the embedded cluster trusts local logins
    return roles.role_url(admin_url, roles.WORKER)


@contextlib.contextmanager
def workers(
    cmd: Sequence[str], env: Mapping[str, str], count: int = WORKERS, timeout: float = 60
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`count` worker processes; on leaving, each gets `timeout` s to exit by itself (it
    idles out), then SIGTERM (it finishes its batch and exits), then SIGKILL."""
    procs = [subprocess.Popen(list(cmd), env=dict(env)) for _ in range(count)]
    try:
        yield procs
    finally:
        deadline = time.monotonic() + timeout
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def submit(request: Request, url: str, key: str, records: list[dict[str, Any]]) -> str:
    """POST /jobs with the tenant's key; the job's id."""
    answer = request(f"{url}/jobs", {"records": records}, key)
    return str(answer["job_id"])


def wait_ended(
    request: Request,
    url: str,
    key: str,
    job_id: str,
    *,
    timeout: float = 180,
    every: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """GET /jobs/{id} until the job is done or failed (or `timeout` s went by: the last
    answer, still queued or running); its results follow `next_offset` to the last page."""
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = request(f"{url}/jobs/{job_id}", None, key)
        if job["status"] in ("done", "failed") or time.monotonic() > deadline:
            break
        sleep(every)
    results = list(job.get("results") or [])
    offset = job.get("next_offset")
    while offset is not None:
        page = request(f"{url}/jobs/{job_id}?offset={offset}", None, key)
        results += page.get("results") or []
        offset = page.get("next_offset")
    return {**job, "results": results}


def outcome(tenant: str, job: Mapping[str, Any], seconds: float) -> JobOutcome:
    """What the demo says of a job, from its last `GET /jobs/{id}` with every result.

    Its time is the service's, created to finished, when it has both; else `seconds`, the
    client's (submission to seen ended).
    """
    results: list[dict[str, Any]] = list(job["results"])
    if job.get("created_at") and job.get("finished_at"):
        created = datetime.fromisoformat(str(job["created_at"]))
        seconds = (datetime.fromisoformat(str(job["finished_at"])) - created).total_seconds()
    models = sorted({f"{r['model_name']} v{r['model_version']}" for r in results})
    return JobOutcome(
        tenant=tenant,
        job_id=str(job["job_id"]),
        records=int(job["records"]),
        status=str(job["status"]),
        models=tuple(models),
        scored=len(results),
        seconds=seconds,
        error=job.get("error"),
    )


def run_jobs(
    request: Request,
    url: str,
    keys: Mapping[str, str],
    records: Mapping[str, list[dict[str, Any]]],
    start_workers: Callable[[], contextlib.AbstractContextManager[Any]],
    *,
    timeout: float = 180,
    every: float = 0.5,
) -> list[JobOutcome]:
    """Submit each tenant's `records` as one job with its key, start the workers, poll
    every job until it ended; one outcome per tenant, in `records`' order."""
    submitted = {
        tenant: (submit(request, url, keys[tenant], rows), time.monotonic())
        for tenant, rows in records.items()
    }
    out: list[JobOutcome] = []
    with start_workers():
        for tenant, (job_id, at) in submitted.items():
            job = wait_ended(request, url, keys[tenant], job_id, timeout=timeout, every=every)
            out.append(outcome(tenant, job, time.monotonic() - at))
    return out
