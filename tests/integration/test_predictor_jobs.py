"""POST /jobs and GET /jobs/{job_id} over HTTP: jobs recorded and queued, or refused whole.

A real `bentoml serve` (2 workers) logging in as `mlops_predictor` to a real PostgreSQL with
pgmq's SQL and three tenants. Chunks are mostly scored in the test process as a worker
would (`tests.integration.scoring`, as the worker role); one test runs a real
`python -m services.worker` and finds its answers equal to /predict's for the same
records. What a tenant
sees of the store is checked as its owner: a refused submission leaves no job row and no
message; a replayed Idempotency-Key queues nothing more; another tenant's job id is a 404
exactly as an unknown one; answers come back in order through `next_offset`.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from common.localpg import LocalPostgres
from common.store import connect, create_staging, jobs, roles
from tests.integration import scoring
from tests.integration.serving import (
    api_key,
    auth,
    predictor_database,
    register_copies,
    serve_predictor,
)
from tests.integration.test_predictor import RECORD
from tests.servers import VENV_BIN, HttpServer, clean_env, throwaway_cluster
from tests.workspace import ROOT, Workspace

SERVED = "churn-jobs"
TENANTS = ("acme", "globex")
LONE = "initech"
"""Only the real worker's test submits for it: its queue holds that one job."""
MAX_BODY = 40_000_000
"""Room for the largest job (100,000 records, ~33 MB), over /predict's 8 MiB."""
MAX_RECORDS = 100_000
CHUNK = 100
CALLBACK_HOST = "hooks.example.com"


@pytest.fixture(scope="module")
def logdb() -> Iterator[LocalPostgres]:
    with throwaway_cluster("jobs", "predictions") as pg:
        yield pg


@pytest.fixture(scope="module")
def urls(logdb: LocalPostgres) -> dict[str, str]:
    """The owner's, the predictor's and the worker role's URLs."""
    admin, predictor = predictor_database(logdb)
    roles.enable_login(admin, roles.WORKER)
    return {"admin": admin, "predictor": predictor, "worker": roles.role_url(admin, roles.WORKER)}


@pytest.fixture(scope="module")
def keys(urls: dict[str, str]) -> dict[str, str]:
    """A `predict` key per tenant; `feedback-only` lacks the scope jobs need."""
    found = {t: api_key(urls["admin"], t, ("predict",)) for t in (*TENANTS, LONE)}
    found["feedback-only"] = api_key(urls["admin"], TENANTS[0], ("feedback",))
    return found


@pytest.fixture(scope="module")
def predictor(
    mlflow_server: HttpServer,
    pipeline: Workspace,
    urls: dict[str, str],
    keys: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    register_copies(mlflow_server.url, SERVED, versions=1)
    env = {
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        "MODEL_NAME": SERVED,
        "MODEL_POLL_SECONDS": "600",
        "DATABASE_URL": urls["predictor"],
        "JOB_MAX_BODY_BYTES": str(MAX_BODY),
        "JOB_MAX_RECORDS": str(MAX_RECORDS),
        "JOB_CHUNK_RECORDS": str(CHUNK),
        "JOB_CALLBACK_HOSTS": CALLBACK_HOST,
    }
    with serve_predictor(tmp_path_factory.mktemp("jobs"), env) as url:
        yield url


def submit(
    predictor: str, key: str, body: Any, headers: dict[str, str] | None = None
) -> httpx.Response:
    return httpx.post(
        f"{predictor}/jobs", json=body, headers={**auth(key), **(headers or {})}, timeout=60
    )


def status(predictor: str, key: str, job_id: str, **params: Any) -> httpx.Response:
    return httpx.get(f"{predictor}/jobs/{job_id}", params=params, headers=auth(key), timeout=30)


def stored(admin: str, tenant: str) -> tuple[int, int]:
    """(the tenant's job rows, messages in its request queue), as the database's owner."""
    with connect(admin) as conn:
        row = conn.execute("SELECT count(*) FROM jobs WHERE tenant_id = %s", [tenant]).fetchone()
        assert row is not None
        return int(row[0]), jobs.depths(conn, [tenant])[0].depth


def test_a_job_is_accepted_with_202_recorded_and_queued_in_chunks(
    predictor: str, keys: dict[str, str], urls: dict[str, str]
) -> None:
    before = stored(urls["admin"], "globex")
    resp = submit(predictor, keys["globex"], {"records": [RECORD] * 250})
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert body["status"] == "queued"
    assert body["records"] == 250
    assert body["status_url"] == f"/jobs/{body['job_id']}"
    assert resp.headers["location"] == body["status_url"]
    assert stored(urls["admin"], "globex") == (before[0] + 1, before[1] + 3)
    with connect(urls["admin"]) as conn:
        job = jobs.get(conn, "globex", body["job_id"])
    assert job is not None
    assert (job.tenant_id, job.records, job.chunks, job.status) == ("globex", 250, 3, "queued")
    page = status(predictor, keys["globex"], body["job_id"]).json()
    assert (page["status"], page["progress"], page["results"]) == ("queued", 0, [])
    assert page["next_offset"] == 0  # nothing to hand out yet: ask again from the start
    metrics = httpx.get(f"{predictor}/metrics", timeout=30).text
    accepted = [ln for ln in metrics.splitlines() if ln.startswith("predictor_jobs_accepted")]
    assert accepted
    assert float(accepted[0].split()[-1]) >= 1


def test_a_job_is_read_back_whole_and_in_order_through_next_offset(
    predictor: str, keys: dict[str, str], urls: dict[str, str]
) -> None:
    records = [{**RECORD, "tenure_months": i % 60} for i in range(1_200)]
    job_id = submit(predictor, keys["acme"], {"records": records}).json()["job_id"]
    scoring.drain(urls["worker"], "acme", SERVED)
    first = status(predictor, keys["acme"], job_id).json()
    assert (first["status"], first["progress"], first["error"]) == ("done", 1, None)
    assert first["finished_at"] is not None
    assert len(first["results"]) == 1_000  # the largest page
    assert first["next_offset"] == 1_000
    last = status(predictor, keys["acme"], job_id, offset=1_000).json()
    assert len(last["results"]) == 200
    assert last["next_offset"] is None
    answers: list[dict[str, Any]] = []
    offset: int | None = 0
    while offset is not None:
        page = status(predictor, keys["acme"], job_id, offset=offset, limit=333).json()
        answers += page["results"]
        offset = page["next_offset"]
    assert [a["request_id"] for a in answers] == [jobs.request_id(job_id, i) for i in range(1_200)]
    assert {(a["model_name"], a["model_version"]) for a in answers} == {(SERVED, "1")}


def test_answers_after_a_record_still_being_scored_wait_for_it(
    predictor: str, keys: dict[str, str], urls: dict[str, str]
) -> None:
    scoring.drain(urls["worker"], "globex", SERVED)  # earlier tests' jobs out of the way
    job_id = submit(predictor, keys["globex"], {"records": [RECORD] * (2 * CHUNK)}).json()["job_id"]
    with connect(urls["worker"]) as conn:
        create_staging(conn)
        first, second = jobs.read(conn, "globex", visibility_timeout=30, limit=2)
        scoring.score(conn, second, SERVED)
        waiting = status(predictor, keys["globex"], job_id).json()
        assert (waiting["status"], waiting["progress"]) == ("running", 0.5)
        assert (waiting["results"], waiting["next_offset"]) == ([], 0)
        scoring.score(conn, first, SERVED)
    done = status(predictor, keys["globex"], job_id).json()
    assert done["status"] == "done"
    assert len(done["results"]) == 2 * CHUNK
    assert done["next_offset"] is None


def test_a_real_worker_answers_a_job_as_predict_answers_its_records(
    predictor: str,
    keys: dict[str, str],
    urls: dict[str, str],
    mlflow_server: HttpServer,
    tmp_path: Path,
) -> None:
    """`python -m services.worker` for the tenant alone; it exits once the queue is idle."""
    rows = [{**RECORD, "tenure_months": i, "support_tickets_90d": i % 7} for i in range(30)]
    job_id = submit(predictor, keys[LONE], {"records": rows}).json()["job_id"]
    env = clean_env(
        DATABASE_URL=urls["worker"],
        MLFLOW_TRACKING_URI=mlflow_server.url,
        MODEL_NAME=SERVED,
        MLOPS_HOME=str(tmp_path / ".mlops"),
        JOB_CHUNK_RECORDS=str(CHUNK),
    )
    command = [str(VENV_BIN / "python"), "-m", "services.worker", "--tenant", LONE]
    worker = subprocess.run(
        [*command, "--idle-exit", "2", "--poll", "0.1"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert worker.returncode == 0, worker.stderr[-4000:]
    page = status(predictor, keys[LONE], job_id).json()
    assert (page["status"], page["progress"], page["next_offset"]) == ("done", 1, None)
    synchronous = httpx.post(
        f"{predictor}/predict", json={"records": rows}, headers=auth(keys[LONE]), timeout=30
    ).json()["predictions"]
    assert [a["request_id"] for a in page["results"]] == [
        jobs.request_id(job_id, i) for i in range(len(rows))
    ]
    same = ("predicted_class", "probabilities", "model_name", "model_version")
    assert [{k: a[k] for k in same} for a in page["results"]] == [
        {k: a[k] for k in same} for a in synchronous
    ]


def test_another_tenants_job_is_a_404_exactly_as_an_unknown_one(
    predictor: str, keys: dict[str, str]
) -> None:
    job_id = submit(predictor, keys["acme"], {"records": [RECORD]}).json()["job_id"]
    assert status(predictor, keys["acme"], job_id).status_code == 200
    foreign = status(predictor, keys["globex"], job_id)
    unknown = status(predictor, keys["globex"], str(uuid.uuid4()))
    malformed = status(predictor, keys["globex"], "not-a-job")
    for resp in (foreign, unknown, malformed):
        assert resp.status_code == 404, resp.text
    assert foreign.json() == unknown.json() == malformed.json()


def test_without_a_key_or_its_scope_jobs_are_refused(predictor: str, keys: dict[str, str]) -> None:
    job_id = submit(predictor, keys["acme"], {"records": [RECORD]}).json()["job_id"]
    no_key = httpx.post(f"{predictor}/jobs", json={"records": [RECORD]}, timeout=30)
    assert no_key.status_code == 401
    assert no_key.headers["www-authenticate"].startswith('Bearer realm="predictor"')
    assert httpx.get(f"{predictor}/jobs/{job_id}", timeout=30).status_code == 401
    assert submit(predictor, keys["feedback-only"], {"records": [RECORD]}).status_code == 403
    assert status(predictor, keys["feedback-only"], job_id).status_code == 403


BAD_JOBS = {
    "bad value": (
        {"records": [RECORD, {**RECORD, "tenure_months": "x"}]},
        "records.1.tenure_months",
    ),
    "missing field": ({"records": [RECORD, RECORD, {}]}, "records.2.tenure_months"),
    "empty list": ({"records": []}, "records: the batch is empty"),
    "no records": ({"callback_url": f"https://{CALLBACK_HOST}/"}, "records: Field required"),
    "unknown field": ({"records": [RECORD], "tenant_id": "globex"}, "tenant_id"),
    "too many": ({"records": [{}] * (MAX_RECORDS + 1)}, f"at most {MAX_RECORDS:,}"),
    "callback off the list": (
        {"records": [RECORD], "callback_url": "https://evil.example.net/x"},
        "callback_url: host 'evil.example.net' is not allowed",
    ),
    "callback not a URL": ({"records": [RECORD], "callback_url": "file:///etc"}, "callback_url"),
    "callback with a NUL": (
        {"records": [RECORD], "callback_url": f"https://{CALLBACK_HOST}/\x00"},
        "callback_url: only printable ASCII",
    ),
}


@pytest.mark.parametrize("case", BAD_JOBS)
def test_a_bad_job_is_a_400_naming_the_field_and_nothing_is_queued(
    predictor: str, keys: dict[str, str], urls: dict[str, str], case: str
) -> None:
    body, named = BAD_JOBS[case]
    before = stored(urls["admin"], "globex")
    resp = submit(predictor, keys["globex"], body)
    assert resp.status_code == 400, resp.text
    assert named in resp.json()["error"], resp.text
    assert stored(urls["admin"], "globex") == before


def test_a_body_over_the_jobs_limit_is_a_413_before_it_is_parsed(
    predictor: str, keys: dict[str, str], urls: dict[str, str]
) -> None:
    before = stored(urls["admin"], "globex")
    big = json.dumps({"records": [RECORD] * 120_000}).encode()
    assert len(big) > MAX_BODY
    headers = {**auth(keys["globex"]), "content-type": "application/json"}
    declared = httpx.post(f"{predictor}/jobs", content=big, headers=headers, timeout=60)
    assert declared.status_code == 413, declared.text
    assert f"over the limit of {MAX_BODY:,} bytes" in declared.json()["error"]

    def chunked() -> Iterator[bytes]:  # no Content-Length: refused once past the limit
        for start in range(0, len(big), 65_536):
            yield big[start : start + 65_536]

    streamed = httpx.post(f"{predictor}/jobs", content=chunked(), headers=headers, timeout=60)
    assert streamed.status_code == 413, streamed.text
    assert stored(urls["admin"], "globex") == before


def test_the_largest_job_is_validated_and_queued_within_seconds(
    predictor: str, keys: dict[str, str], urls: dict[str, str]
) -> None:
    records = [{**RECORD, "tenure_months": i % 60} for i in range(MAX_RECORDS)]
    body = json.dumps({"records": records}).encode()
    assert len(body) > 8 * 1024 * 1024  # /predict's limit: the route has its own
    headers = {**auth(keys["acme"]), "content-type": "application/json"}
    started = time.perf_counter()
    resp = httpx.post(f"{predictor}/jobs", content=body, headers=headers, timeout=120)
    elapsed = time.perf_counter() - started
    assert resp.status_code == 202, resp.text
    assert resp.json()["records"] == MAX_RECORDS
    print(f"\n{MAX_RECORDS:,} records ({len(body) / 1e6:.0f} MB) accepted in {elapsed:.1f} s")
    assert elapsed < 30  # BentoML's request timeout
    with connect(urls["admin"]) as conn:
        job = jobs.get(conn, "acme", resp.json()["job_id"])
    assert job is not None
    assert job.chunks == MAX_RECORDS // CHUNK


def test_an_idempotency_key_replay_returns_the_same_job_and_queues_nothing_more(
    predictor: str, keys: dict[str, str], urls: dict[str, str]
) -> None:
    key = {"Idempotency-Key": f"nightly-{uuid.uuid4()}"}
    first = submit(predictor, keys["globex"], {"records": [RECORD] * 3}, key)
    assert first.status_code == 202, first.text
    after_first = stored(urls["admin"], "globex")
    again = submit(predictor, keys["globex"], {"records": [RECORD] * 3}, key)
    assert again.status_code == 202, again.text
    assert again.json() == first.json()
    assert again.headers["location"] == first.headers["location"]
    assert stored(urls["admin"], "globex") == after_first
    other = submit(predictor, keys["acme"], {"records": [RECORD] * 3}, key)
    assert other.json()["job_id"] != first.json()["job_id"]  # keys are per tenant
    too_long = submit(
        predictor, keys["globex"], {"records": [RECORD]}, {"Idempotency-Key": "k" * 201}
    )
    assert too_long.status_code == 400
    assert "Idempotency-Key" in too_long.json()["error"]


def test_a_callback_url_on_the_allow_list_is_kept_with_the_job(
    predictor: str, keys: dict[str, str], urls: dict[str, str]
) -> None:
    url = f"https://{CALLBACK_HOST}/jobs/done?token=abc"
    resp = submit(predictor, keys["acme"], {"records": [RECORD], "callback_url": url})
    assert resp.status_code == 202, resp.text
    with connect(urls["admin"]) as conn:
        job = jobs.get(conn, "acme", resp.json()["job_id"])
    assert job is not None
    assert job.callback_url == url
    assert job.key_id is not None


def test_an_unknown_query_parameter_is_a_400_naming_it(
    predictor: str, keys: dict[str, str]
) -> None:
    job_id = submit(predictor, keys["acme"], {"records": [RECORD]}).json()["job_id"]
    resp = status(predictor, keys["acme"], job_id, ofset=10)
    assert resp.status_code == 400
    assert resp.json()["error"].startswith("ofset:")
    for params in ({"limit": 0}, {"limit": 1001}, {"offset": -1}):
        resp = status(predictor, keys["acme"], job_id, **params)
        assert resp.status_code == 400, params
        assert next(iter(params)) in resp.json()["error"]


def test_with_the_database_down_a_job_is_a_503_and_nothing_is_half_written(
    predictor: str, keys: dict[str, str], urls: dict[str, str], logdb: LocalPostgres
) -> None:
    for _ in range(8):  # a worker that checked the key lately lets it in while PG is away
        submit(predictor, keys["globex"], {"records": [RECORD]})
    before = stored(urls["admin"], "globex")
    answers: list[httpx.Response] = []
    logdb.stop()
    try:  # until a worker that knows the key answers (the other cannot check it: also 503)
        while len(answers) < 20 and not any("nothing was queued" in r.text for r in answers):
            answers.append(submit(predictor, keys["globex"], {"records": [RECORD] * 10}))
    finally:
        logdb.start()
    assert {r.status_code for r in answers} == {503}, [r.text for r in answers]
    assert "nothing was queued" in answers[-1].json()["error"]
    assert stored(urls["admin"], "globex") == before
