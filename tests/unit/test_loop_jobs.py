"""The demo's job step against an in-memory predictor playing the /jobs contract: who
submits what with which key, when the workers start, how a job is followed to its end and
what the demo prints of it. The real predictor and workers are the e2e test's."""

from __future__ import annotations

import contextlib
import sys
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from common.settings import Settings
from scripts import loop_jobs

pytestmark = pytest.mark.unit

URL = "http://predictor"
KEYS = {"acme": "key-of-acme", "globex": "key-of-globex"}
MODELS = {"acme": ("churn-classifier.acme", "2"), "globex": ("churn-classifier", "1")}


@dataclass
class FakeJobs:
    """POST /jobs and GET /jobs/{id} in memory: a job is scored once the workers run, after
    `polls` more looks at it; results come `page` at a time."""

    polls: int = 2
    page: int = 1000
    fail: bool = False
    workers_running: bool = False
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    submitted: list[tuple[str, int, bool]] = field(default_factory=list)
    """(key, records, whether the workers were running already) of each POST /jobs."""

    def tenant(self, key: str | None) -> str:
        return next(t for t, k in KEYS.items() if k == key)

    def __call__(self, url: str, body: dict[str, Any] | None = None, key: str | None = None) -> Any:
        parts = urllib.parse.urlsplit(url)
        if parts.path == "/jobs":
            assert body is not None
            job_id = str(uuid.uuid4())
            self.jobs[job_id] = {"tenant": self.tenant(key), "records": body["records"], "looks": 0}
            self.submitted.append((str(key), len(body["records"]), self.workers_running))
            return {"job_id": job_id, "status": "queued", "records": len(body["records"])}
        job_id = parts.path.removeprefix("/jobs/")
        job = self.jobs[job_id]
        assert job["tenant"] == self.tenant(key), "another tenant's job"
        if self.workers_running:
            job["looks"] += 1
        done = job["looks"] > self.polls
        status = ("failed" if self.fail else "done") if done else "running"
        name, version = MODELS[job["tenant"]]
        offset = int(dict(urllib.parse.parse_qsl(parts.query)).get("offset", 0))
        n = len(job["records"]) if done and not self.fail else 0
        end = min(n, offset + self.page)
        return {
            "job_id": job_id,
            "tenant_id": job["tenant"],
            "status": status,
            "records": len(job["records"]),
            "error": "chunk 0 (records 0+): boom" if done and self.fail else None,
            "created_at": "2026-12-02T11:00:00+00:00",
            "finished_at": "2026-12-02T11:00:03.500000+00:00" if done else None,
            "results": [
                {"request_id": str(i), "model_name": name, "model_version": version}
                for i in range(offset, end)
            ],
            "next_offset": end if end < n else None,
        }

    @contextlib.contextmanager
    def start_workers(self) -> Iterator[None]:
        self.workers_running = True
        yield
        self.workers_running = False


def records(n: int) -> list[dict[str, Any]]:
    return [{"tenure_months": i} for i in range(n)]


def run(fake: FakeJobs, sizes: dict[str, int]) -> list[loop_jobs.JobOutcome]:
    return loop_jobs.run_jobs(
        fake, URL, KEYS, {t: records(n) for t, n in sizes.items()}, fake.start_workers, every=0
    )


def test_each_tenant_submits_its_own_records_with_its_own_key_before_workers_start() -> None:
    fake = FakeJobs()
    run(fake, {"acme": 300, "globex": 200})
    assert fake.submitted == [("key-of-acme", 300, False), ("key-of-globex", 200, False)]


def test_each_job_is_followed_to_done_and_names_the_model_that_scored_it() -> None:
    fake = FakeJobs(polls=3)
    outcomes = run(fake, {"acme": 300, "globex": 200})
    assert [(o.tenant, o.status, o.scored, o.models, o.ok) for o in outcomes] == [
        ("acme", "done", 300, ("churn-classifier.acme v2",), True),
        ("globex", "done", 200, ("churn-classifier v1",), True),
    ]
    assert (
        outcomes[0]
        .line()
        .endswith(
            "300 records scored by churn-classifier.acme v2, done 3.5 s after it was submitted "
            "(the workers' start included)"
        )
    )


def test_results_are_read_to_the_last_page() -> None:
    fake = FakeJobs(page=128)
    (acme,) = run(fake, {"acme": 300})
    assert acme.scored == 300
    assert acme.ok


def test_a_failed_job_is_printed_as_failed_with_its_error() -> None:
    (acme,) = run(FakeJobs(fail=True), {"acme": 300})
    assert not acme.ok
    assert "FAILED" in acme.line()
    assert "0 of 300 records answered (no model): chunk 0 (records 0+): boom" in acme.line()


def test_a_job_still_running_at_the_timeout_is_not_counted_as_done() -> None:
    fake = FakeJobs(polls=10**9)
    (acme,) = loop_jobs.run_jobs(
        fake, URL, KEYS, {"acme": records(10)}, fake.start_workers, timeout=0.05, every=0.01
    )
    assert acme.status == "running"
    assert not acme.ok
    assert "RUNNING" in acme.line()


def test_workers_serve_exactly_the_demo_tenants_and_exit_when_idle() -> None:
    cmd = loop_jobs.worker_command(["acme", "globex"], idle_exit=5)
    assert cmd[1:] == [
        "-m", "services.worker", "--idle-exit", "5", "--tenant", "acme", "--tenant", "globex",
    ]  # fmt: skip


def test_workers_that_idle_out_are_waited_for_and_the_others_stopped() -> None:
    idles_out = [sys.executable, "-c", "import time; time.sleep(0.2)"]
    with loop_jobs.workers(idles_out, {}, count=2, timeout=10) as procs:
        pass
    assert [p.returncode for p in procs] == [0, 0]
    hangs = [sys.executable, "-c", "import time; time.sleep(60)"]
    with loop_jobs.workers(hangs, {}, count=1, timeout=0.2) as procs:
        pass
    assert procs[0].returncode not in (None, 0)


def test_workers_log_in_with_the_stacks_database_url_when_one_is_set() -> None:
    settings = Settings.model_validate({"DATABASE_URL": "postgresql://worker@db/predictions"})
    assert (
        loop_jobs.worker_database_url(settings, "postgresql://unused")
        == "postgresql://worker@db/predictions"
    )
