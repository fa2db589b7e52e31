"""The predictor follows a registry webhook at once, and flags out-of-range values if told to.

A real `bentoml serve` (2 workers) polling its alias only every 10 minutes, so a swap
within seconds can only come from the POST to /webhooks/mlflow. The same server runs with
PREDICT_OUT_OF_RANGE=flag.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from mlflow.tracking import MlflowClient

from tests.integration.serving import register_copies, serve_predictor
from tests.integration.test_predictor import RECORD
from tests.servers import HttpServer, throwaway_cluster
from tests.workspace import Workspace

SERVED = "churn-webhook"
QUIET_SECONDS = 4.0
"""How long the moved alias must go unnoticed without a webhook (the poll is 600 s)."""
SWAP_SECONDS = 10.0
"""How soon after the webhook every worker must serve the new version."""


@pytest.fixture(scope="module")
def registry(mlflow_server: HttpServer, pipeline: Workspace) -> MlflowClient:
    return register_copies(mlflow_server.url, SERVED)


@pytest.fixture(scope="module")
def predictor(
    registry: MlflowClient,
    mlflow_server: HttpServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    with throwaway_cluster("webhook", "predictions") as pg:
        env = {
            "MLFLOW_TRACKING_URI": mlflow_server.url,
            "MODEL_NAME": SERVED,
            "MODEL_POLL_SECONDS": "600",
            "PREDICT_OUT_OF_RANGE": "flag",
            "DATABASE_URL": pg.url("predictions"),
        }
        with serve_predictor(tmp_path_factory.mktemp("webhook"), env) as url:
            yield url


def served_versions(url: str, asks: int = 8) -> set[str]:
    """The version /model reports, asked on fresh connections (they land on either worker)."""
    return {
        httpx.get(f"{url}/model/", follow_redirects=True, timeout=10).json()["model_version"]
        for _ in range(asks)
    }


def test_a_webhook_makes_every_worker_swap_at_once(predictor: str, registry: MlflowClient) -> None:
    assert served_versions(predictor) == {"1"}
    registry.set_registered_model_alias(SERVED, "champion", "2")
    deadline = time.monotonic() + QUIET_SECONDS
    while time.monotonic() < deadline:  # no webhook: nobody looks before the next poll
        assert served_versions(predictor, asks=2) == {"1"}
        time.sleep(0.5)
    event = {  # the body MLflow sends for an alias event
        "entity": "model_version_alias",
        "action": "created",
        "timestamp": "2026-12-02T00:00:00+00:00",
        "data": {"name": SERVED, "alias": "champion", "version": "2"},
    }
    resp = httpx.post(f"{predictor}/webhooks/mlflow", json=event, timeout=10)
    assert resp.status_code == 200, resp.text
    sent = time.monotonic()
    while (versions := served_versions(predictor)) != {"2"}:
        assert time.monotonic() - sent < SWAP_SECONDS, versions
        time.sleep(0.25)
    resp = httpx.post(f"{predictor}/predict", json={"records": RECORD}, timeout=10)
    assert resp.json()["model_version"] == "2"


def test_flag_mode_scores_out_of_range_values_and_names_them(predictor: str) -> None:
    records = [RECORD, {**RECORD, "age": 1e308, "tenure_months": 10**40}]
    resp = httpx.post(f"{predictor}/predict", json={"records": records}, timeout=10)
    assert resp.status_code == 200, resp.text
    first, second = resp.json()["predictions"]
    assert first["warnings"] == []
    assert [w.split(":")[0] for w in second["warnings"]] == ["tenure_months", "age"]
    docs = httpx.get(f"{predictor}/docs.json", timeout=10).json()
    body = docs["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    age = body["schema"]["properties"]["records"]["anyOf"][1]["properties"]["age"]
    assert "maximum" not in age["anyOf"][0]  # accepted, so not published as a bound
