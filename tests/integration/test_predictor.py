"""The predictor as users meet it: a real `bentoml serve` on the champion from a real MLflow server.

Its prediction log is a PostgreSQL cluster of its own, so the outage test can take that
database away without touching the MLflow server's; the service logs in to it as
`mlops_predictor`, and every request carries a key of the default tenant.
"""

from __future__ import annotations

import json
import math
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from mlflow.tracking import MlflowClient

from common.localpg import LocalPostgres
from tests.integration.serving import (
    api_key,
    auth,
    predictor_database,
    register_copies,
    serve_predictor,
)
from tests.servers import VENV_BIN, HttpServer, throwaway_cluster
from tests.workspace import Workspace

SERVED = "churn-serving"
MAX_BATCH = 50


@pytest.fixture(scope="module")
def registry(mlflow_server: HttpServer, pipeline: Workspace) -> MlflowClient:
    """`churn-serving` v1 and v2 (same artifacts as the pipeline's champion), champion -> v1."""
    return register_copies(mlflow_server.url, SERVED)


@pytest.fixture(scope="module")
def logdb() -> Iterator[LocalPostgres]:
    """The prediction log's own cluster, so its outage leaves the MLflow server's alone."""
    with throwaway_cluster("predlog", "predictions") as pg:
        yield pg


@pytest.fixture(scope="module")
def predictor(
    registry: MlflowClient,
    mlflow_server: HttpServer,
    logdb: LocalPostgres,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    home = tmp_path_factory.mktemp("predictor")
    _, as_predictor = predictor_database(logdb)
    env = {
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        "MODEL_NAME": SERVED,
        "MODEL_POLL_SECONDS": "1",
        "PREDICT_MAX_BATCH": str(MAX_BATCH),
        "DATABASE_URL": as_predictor,
    }
    with serve_predictor(home, env) as url:
        yield url


@pytest.fixture(scope="module")
def key(logdb: LocalPostgres) -> str:
    """A key of the default tenant with every scope."""
    return api_key(logdb.url("predictions"))


@pytest.fixture(scope="module")
def headers(key: str) -> dict[str, str]:
    return auth(key)


RECORD: dict[str, Any] = {
    "tenure_months": 12,
    "monthly_charges": 70.5,
    "total_charges": 846.0,
    "support_tickets_90d": 2,
    "avg_daily_usage_min": 60.0,
    "days_since_last_login": 3,
    "num_products": 2,
    "age": 41,
    "late_payments_12m": 0,
    "satisfaction_score": None,
    "contract_type": "month_to_month",
    "payment_method": "electronic_check",
    "region": "north",
    "plan_tier": "standard",
}


def predict(url: str, headers: dict[str, str], records: Any) -> httpx.Response:
    return httpx.post(f"{url}/predict", json={"records": records}, headers=headers, timeout=30)


def test_predicts_one_record_with_request_id_and_version(
    predictor: str, headers: dict[str, str]
) -> None:
    resp = predict(predictor, headers, RECORD)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["tenant_id"] == "default"
    (answer,) = body["predictions"]
    assert answer["model_name"] == SERVED
    assert answer["model_version"] in ("1", "2")
    assert answer["predicted_class"] in answer["probabilities"]
    assert math.isclose(sum(answer["probabilities"].values()), 1.0, abs_tol=1e-5)
    uuid.UUID(answer["request_id"])


def test_predicts_a_list_in_order_with_distinct_ids(
    predictor: str, headers: dict[str, str]
) -> None:
    records = [RECORD, {**RECORD, "contract_type": "two_year", "tenure_months": 60}]
    answers = predict(predictor, headers, records).json()["predictions"]
    assert len(answers) == 2
    assert answers[0]["request_id"] != answers[1]["request_id"]
    churn_m2m = answers[0]["probabilities"]["1"]
    churn_two_year = answers[1]["probabilities"]["1"]
    assert churn_two_year < churn_m2m


BAD_INPUTS = {
    "missing field": ({k: v for k, v in RECORD.items() if k != "age"}, "age"),
    "wrong type": ({**RECORD, "age": "forty"}, "age"),
    "unknown extra field": ({**RECORD, "shoe_size": 44}, "shoe_size"),
    "unseen category": ({**RECORD, "region": "atlantis"}, "region"),
    "infinity": ({**RECORD, "monthly_charges": math.inf}, "monthly_charges"),
    "nan": ({**RECORD, "monthly_charges": math.nan}, "monthly_charges"),
    "empty list": ([], "empty"),
    "oversized batch": ([RECORD] * (MAX_BATCH + 1), str(MAX_BATCH)),
    "above the trained range": ({**RECORD, "age": 1e308}, "age"),
    "huge integer": ({**RECORD, "tenure_months": 10**40}, "tenure_months"),
    "below the trained range": ([RECORD, {**RECORD, "num_products": 0}], "num_products"),
    "empty record": ({}, "tenure_months"),
    "empty record in a list": ([{}], "tenure_months"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_a_4xx_naming_the_problem(
    predictor: str, headers: dict[str, str], case: str
) -> None:
    payload, named = BAD_INPUTS[case]
    body = json.dumps({"records": payload}, allow_nan=True)
    resp = httpx.post(
        f"{predictor}/predict",
        content=body,
        headers={"content-type": "application/json", **headers},
    )
    assert 400 <= resp.status_code < 500, resp.text
    assert named in resp.text


@pytest.mark.parametrize(
    ("headers", "content", "status"),
    [
        ({"content-type": "text/plain"}, b"{}", 415),
        ({"content-type": "multipart/form-data"}, b'{"records": []}', 415),
        ({"content-type": "application/json"}, b"x" * (9 * 1024 * 1024), 413),
        ({"content-type": "application/json"}, b"{not json", 400),
    ],
)
def test_malformed_or_oversized_bodies_are_refused(
    predictor: str, key: str, headers: dict[str, str], content: bytes, status: int
) -> None:
    resp = httpx.post(
        f"{predictor}/predict", content=content, headers={**headers, **auth(key)}, timeout=30
    )
    assert resp.status_code == status, resp.text
    assert resp.json()


def test_feedback_joins_a_prediction_by_request_id(
    predictor: str, headers: dict[str, str], key: str, logdb: LocalPostgres
) -> None:
    request_id = predict(predictor, headers, RECORD).json()["predictions"][0]["request_id"]
    resp = httpx.post(
        f"{predictor}/feedback", json={"request_id": request_id, "label": "1"}, headers=headers
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["tenant_id"] == "default"
    with psycopg.connect(logdb.url("predictions")) as conn:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT p.tenant_id, f.label, f.source FROM predictions p "
                "JOIN feedback f USING (tenant_id, request_id) WHERE request_id = %s",
                (request_id,),
            ).fetchone()
            if row:
                break
            time.sleep(0.2)
    assert row is not None
    assert row == ("default", "1", f"key:{key.split('_')[1]}")


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        ({"request_id": str(uuid.uuid4()), "label": "1"}, 404),
        ({"request_id": "not-a-uuid", "label": "1"}, 400),
        ({"request_id": str(uuid.uuid4()), "label": "maybe"}, 400),
    ],
)
def test_feedback_rejects_unknown_ids_and_labels(
    predictor: str, headers: dict[str, str], payload: dict[str, str], status: int
) -> None:
    resp = httpx.post(f"{predictor}/feedback", json=payload, headers=headers, timeout=30)
    assert resp.status_code == status, resp.text


def test_model_endpoint_shows_version_and_lineage(predictor: str, headers: dict[str, str]) -> None:
    info = httpx.get(f"{predictor}/model/", headers=headers, follow_redirects=True).json()
    assert info["model_name"] == SERVED
    assert info["backend"] == "onnx"
    assert info["registry"]["reachable"] is True
    assert info["lineage"]["onnx.parity"] == "passed"
    assert len(info["lineage"]["git.commit"]) >= 40


def test_metrics_expose_predictions_latency_queue_and_swaps(
    predictor: str, headers: dict[str, str]
) -> None:
    predict(predictor, headers, RECORD)
    text = httpx.get(f"{predictor}/metrics").text  # no key: Prometheus scrapes it
    for name in (
        "predictor_predictions_total",
        "predictor_prediction_latency_seconds_bucket",
        "predictor_log_queue_depth",
        "predictor_model_swaps_total",
        "predictor_registry_up",
    ):
        assert name in text


def _traffic(
    url: str, headers: dict[str, str], stop: threading.Event, out: list[tuple[float, int, str]]
) -> None:
    with httpx.Client(timeout=30, headers=headers) as client:
        while not stop.is_set():
            try:
                resp = client.post(f"{url}/predict", json={"records": RECORD})
                version = resp.json()["model_version"] if resp.status_code == 200 else ""
                out.append((time.monotonic(), resp.status_code, version))
            except httpx.HTTPError as exc:
                out.append((time.monotonic(), 0, type(exc).__name__))


def test_prediction_log_survives_a_database_outage_exactly_once(
    predictor: str, headers: dict[str, str], logdb: LocalPostgres
) -> None:
    ids: list[str] = []

    def send(n: int) -> None:
        for _ in range(n):
            resp = predict(predictor, headers, [RECORD, RECORD])
            assert resp.status_code == 200, resp.text
            ids.extend(a["request_id"] for a in resp.json()["predictions"])

    send(20)  # both workers have checked the key
    logdb.stop(mode="immediate")
    send(40)  # the service keeps answering while its database (and key store) is gone
    assert _gauge(predictor, "predictor_log_queue_depth")[0] > 0
    logdb.start()
    # With no request meanwhile, the queue gauge comes down to 0 (the writer updates it).
    deadline = time.monotonic() + 60
    while (depths := _gauge(predictor, "predictor_log_queue_depth")) != [0.0]:
        assert time.monotonic() < deadline, depths
        time.sleep(0.5)
    send(20)
    with psycopg.connect(logdb.url("predictions")) as conn:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            (found,) = conn.execute(
                "SELECT count(*) FROM predictions WHERE request_id = ANY(%s::uuid[])", (ids,)
            ).fetchone() or (0,)
            if found >= len(ids):
                break
            time.sleep(0.5)
        (total,) = conn.execute("SELECT count(*) FROM predictions").fetchone() or (0,)
        (distinct,) = conn.execute(
            "SELECT count(DISTINCT request_id) FROM predictions"
        ).fetchone() or (0,)
    assert found == len(ids)
    assert total == distinct


def _gauge(url: str, name: str) -> list[float]:
    lines = httpx.get(f"{url}/metrics", timeout=10).text.splitlines()
    return [
        float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith((f"{name} ", f"{name}{{"))
    ]


def test_alias_move_swaps_live_with_no_failed_request(
    predictor: str, headers: dict[str, str], registry: MlflowClient
) -> None:
    results: list[tuple[float, int, str]] = []
    stop = threading.Event()
    clients = [
        threading.Thread(target=_traffic, args=(predictor, headers, stop, results))
        for _ in range(4)
    ]
    for t in clients:
        t.start()
    try:
        time.sleep(2)
        moved_at = time.monotonic()
        registry.set_registered_model_alias(SERVED, "champion", "2")
        time.sleep(8)  # both workers poll every second; loading takes a moment
        settled_at = time.monotonic()
        time.sleep(2)
    finally:
        stop.set()
        for t in clients:
            t.join()
    assert results
    assert all(status == 200 for _, status, _ in results), {s for _, s, _ in results}
    assert all(version in ("1", "2") for _, _, version in results)
    assert any(v == "1" for t, _, v in results if t < moved_at)
    after = [v for t, _, v in results if t > settled_at]
    assert after
    assert set(after) == {"2"}
    info = httpx.get(f"{predictor}/model/", headers=headers, follow_redirects=True).json()
    assert info["model_version"] == "2"


def test_generated_requests_never_get_a_server_error(
    predictor: str, key: str, tmp_path: Path
) -> None:
    """Schemathesis drives every API operation from the service's OpenAPI; no 5xx allowed."""
    junit = tmp_path / "junit.xml"
    proc = subprocess.run(
        [
            str(VENV_BIN / "schemathesis"),
            "run",
            f"{predictor}/docs.json",
            *("--header", f"Authorization: Bearer {key}"),
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "15",
            "--generation-deterministic",
            # Only failures name their operation on stdout; the report lists every one.
            *("--report", "junit", "--report-junit-path", str(junit)),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "/predict" in junit.read_text()
