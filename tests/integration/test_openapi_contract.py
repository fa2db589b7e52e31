"""The predictor's HTTP API does what its OpenAPI document says: schemathesis, every check.

A real `bentoml serve` on a model copied from the pipeline's champion, logging in to its
database as `mlops_predictor`; schemathesis reads the served /docs.json and runs all its
phases (examples, coverage, fuzzing, stateful) with `--checks all` and a valid key: no
server error, every response status, header and body as documented, schema-valid requests
accepted, schema-invalid ones refused, 405 for undocumented methods, and every operation
that declares the key refusing a request without it. Jobs are submitted (POST /jobs, with
callback URLs to the one allowed host) and looked up (GET /jobs/{job_id}, linked from the
submission); no worker runs, so they stay queued. Without a key, every operation but
health and metrics answers 401.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from common.localpg import LocalPostgres
from tests.integration import schemathesis_hooks
from tests.integration.serving import api_key, predictor_database, register_copies, serve_predictor
from tests.servers import VENV_BIN, HttpServer, throwaway_cluster
from tests.workspace import Workspace

SERVED = "churn-contract"
MAX_BATCH = 20
JOB_MAX_RECORDS = 50
MAX_EXAMPLES = 50
"""Per operation and phase: ~650 requests, about a minute on 2 busy cores. Most of it is
/feedback, where an unknown request_id is looked up for ~1.25 s before its 404."""
SEED = 20261202
PUBLIC = {"/livez", "/healthz", "/readyz", "/metrics"}
"""The documented operations that need no key: health and metrics (the docs are not in it)."""


@pytest.fixture(scope="module")
def logdb() -> Iterator[LocalPostgres]:
    with throwaway_cluster("contract", "predictions") as pg:
        yield pg


@pytest.fixture(scope="module")
def predictor(
    mlflow_server: HttpServer,
    pipeline: Workspace,
    logdb: LocalPostgres,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    register_copies(mlflow_server.url, SERVED, versions=1)
    _, as_predictor = predictor_database(logdb)
    env = {
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        "MODEL_NAME": SERVED,
        "PREDICT_MAX_BATCH": str(MAX_BATCH),
        "JOB_MAX_RECORDS": str(JOB_MAX_RECORDS),
        "JOB_CALLBACK_HOSTS": "hooks.example.com",
        "DATABASE_URL": as_predictor,
    }
    with serve_predictor(tmp_path_factory.mktemp("contract"), env) as url:
        yield url


@pytest.fixture(scope="module")
def key(logdb: LocalPostgres) -> str:
    """A key of the default tenant with every scope, so every operation is reachable."""
    return api_key(logdb.url("predictions"))


def test_api_conforms_to_its_openapi_document_under_every_check(
    predictor: str, key: str, tmp_path: Path
) -> None:
    junit = tmp_path / "junit.xml"
    proc = subprocess.run(
        [
            str(VENV_BIN / "schemathesis"),
            "run",
            f"{predictor}/docs.json",
            *("--header", f"Authorization: Bearer {key}"),
            *("--checks", "all"),
            *("--max-examples", str(MAX_EXAMPLES)),
            *("--seed", str(SEED)),
            *("--generation-database", "none"),  # the same cases every run
            # One worker: with two, Hypothesis' source inspection (ast.parse in threads) hit
            # "SystemError: AST constructor recursion depth mismatch" on Python 3.11.
            *("--workers", "1"),
            # A failure names its operation and the request that provoked it.
            *("--no-color", "--output-truncate", "false"),
            *("--report", "junit", "--report-junit-path", str(junit)),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        cwd=tmp_path,
        env={**os.environ, "SCHEMATHESIS_HOOKS": schemathesis_hooks.__file__},
    )
    report = proc.stdout[-12000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, report
    # The /predict -> /feedback link gives the stateful phase real request ids to send.
    assert "Stateful (not applicable)" not in proc.stdout, report
    tested = junit.read_text()  # one testcase per operation
    operations = (
        "POST /predict",
        "POST /feedback",
        "GET /predictions",
        "POST /webhooks/mlflow",
        "POST /jobs",
        "GET /jobs/{job_id}",
    )
    for operation in (*operations, "GET /model/", "GET /livez"):
        assert f'name="{operation}"' in tested, tested


def _minimal_request(operation: dict[str, Any]) -> dict[str, Any]:
    """A request shaped as the operation wants it (a JSON body if it takes one)."""
    if "requestBody" in operation:
        return {"json": {}}
    return {}


def test_without_a_key_every_operation_but_health_and_metrics_is_401(predictor: str) -> None:
    spec = httpx.get(f"{predictor}/docs.json", timeout=30).json()
    assert set(spec["components"]["securitySchemes"]) >= {"bearer", "apiKey"}
    refused: set[str] = set()
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            for headers in ({}, {"authorization": "Bearer mlops_0000000000000000_" + "x" * 43}):
                resp = httpx.request(
                    method,
                    f"{predictor}{path}",
                    headers=headers,
                    timeout=30,
                    **_minimal_request(operation),
                )
                if path in PUBLIC:
                    assert resp.status_code == 200, (method, path, resp.text)
                    assert "security" not in operation
                    continue
                assert resp.status_code == 401, (method, path, resp.status_code, resp.text)
                assert resp.headers["www-authenticate"].startswith('Bearer realm="predictor"')
                assert resp.json()["error"]
                assert operation["security"] == [{"bearer": []}, {"apiKey": []}]
                refused.add(f"{method.upper()} {path}")
    assert refused == {
        "POST /predict",
        "POST /feedback",
        "GET /predictions",
        "POST /webhooks/mlflow",
        "GET /model/",
        "POST /jobs",
        "GET /jobs/{job_id}",
    }
    for public in ("/docs.json", "/", "/livez", "/readyz", "/metrics"):  # Swagger UI loads
        assert httpx.get(f"{predictor}{public}", timeout=30).status_code == 200, public
