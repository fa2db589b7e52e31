"""The predictor follows a registry webhook at once, and flags out-of-range values if told to.

A real `bentoml serve` (2 workers) polling its alias only every 10 minutes, so a swap
within seconds can only come from the POST to /webhooks/mlflow. It has a webhook secret,
so only a delivery MLflow signed gets in: the one sent here is made and signed by MLflow's
own delivery code. The same server runs with PREDICT_OUT_OF_RANGE=flag.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
import requests
from mlflow.entities.webhook import Webhook, WebhookAction, WebhookEntity, WebhookEvent
from mlflow.tracking import MlflowClient
from mlflow.webhooks.delivery import _create_webhook_session, _send_webhook_request
from mlflow.webhooks.types import ModelVersionAliasCreatedPayload

from common.localpg import LocalPostgres
from tests.integration.serving import (
    api_key,
    auth,
    predictor_database,
    register_copies,
    serve_predictor,
)
from tests.integration.test_predictor import RECORD
from tests.servers import HttpServer, throwaway_cluster
from tests.workspace import Workspace

SERVED = "churn-webhook"
QUIET_SECONDS = 4.0
"""How long the moved alias must go unnoticed without a webhook (the poll is 600 s)."""
SWAP_SECONDS = 10.0
"""How soon after the webhook every worker must serve the new version."""
SECRET = "webhook-s3cret"


@pytest.fixture(scope="module")
def registry(mlflow_server: HttpServer, pipeline: Workspace) -> MlflowClient:
    return register_copies(mlflow_server.url, SERVED)


@pytest.fixture(scope="module")
def logdb() -> Iterator[LocalPostgres]:
    with throwaway_cluster("webhook", "predictions") as pg:
        yield pg


@pytest.fixture(scope="module")
def predictor(
    registry: MlflowClient,
    mlflow_server: HttpServer,
    logdb: LocalPostgres,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    _, as_predictor = predictor_database(logdb)
    env = {
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        "MODEL_NAME": SERVED,
        "MODEL_POLL_SECONDS": "600",
        "PREDICT_OUT_OF_RANGE": "flag",
        "DATABASE_URL": as_predictor,
        "MLFLOW_WEBHOOK_SECRET": SECRET,
    }
    with serve_predictor(tmp_path_factory.mktemp("webhook"), env) as url:
        yield url


@pytest.fixture(scope="module")
def headers(logdb: LocalPostgres) -> dict[str, str]:
    """A key of the default tenant with every scope, admin included."""
    return auth(api_key(logdb.url("predictions")))


def served_versions(url: str, headers: dict[str, str], asks: int = 8) -> set[str]:
    """The version /model reports, asked on fresh connections (they land on either worker)."""
    return {
        httpx.get(f"{url}/model/", headers=headers, follow_redirects=True, timeout=10).json()[
            "model_version"
        ]
        for _ in range(asks)
    }


def mlflow_delivers(url: str, secret: str, version: str) -> requests.Response:
    """What an MLflow 3 server sends when `champion` moves: its own delivery code, signed."""
    event = WebhookEvent(WebhookEntity.MODEL_VERSION_ALIAS, WebhookAction.CREATED)
    hook = Webhook("wh-1", "predictor", f"{url}/webhooks/mlflow", [event], 0, 0, secret=secret)
    payload = ModelVersionAliasCreatedPayload(name=SERVED, alias="champion", version=version)
    return _send_webhook_request(hook, payload, event, _create_webhook_session())


@pytest.fixture
def mlflow_may_call_localhost(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow delivers to public https URLs only, unless told it is a local setup."""
    monkeypatch.setenv("MLFLOW_WEBHOOK_ALLOWED_SCHEMES", "http,https")
    monkeypatch.setenv("MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS", "true")


@pytest.mark.usefixtures("mlflow_may_call_localhost")
def test_a_webhook_makes_every_worker_swap_at_once(
    predictor: str, headers: dict[str, str], registry: MlflowClient
) -> None:
    assert served_versions(predictor, headers) == {"1"}
    registry.set_registered_model_alias(SERVED, "champion", "2")
    deadline = time.monotonic() + QUIET_SECONDS
    while time.monotonic() < deadline:  # no webhook: nobody looks before the next poll
        assert served_versions(predictor, headers, asks=2) == {"1"}
        time.sleep(0.5)
    delivered = mlflow_delivers(predictor, SECRET, "2")
    assert delivered.status_code == 200, delivered.text
    sent = time.monotonic()
    while (versions := served_versions(predictor, headers)) != {"2"}:
        assert time.monotonic() - sent < SWAP_SECONDS, versions
        time.sleep(0.25)
    resp = httpx.post(f"{predictor}/predict", json={"records": RECORD}, headers=headers, timeout=10)
    assert resp.json()["model_version"] == "2"


@pytest.mark.usefixtures("mlflow_may_call_localhost")
def test_with_a_secret_only_a_delivery_mlflow_signed_gets_in(
    predictor: str, headers: dict[str, str]
) -> None:
    forged = mlflow_delivers(predictor, "not-the-secret", "1")
    assert forged.status_code == 401, forged.text
    assert "does not match" in forged.json()["error"]
    event = {"entity": "model_version_alias", "action": "created", "data": {}}
    for sent in ({}, headers):  # MLflow sends no key; an admin key is no signature either
        resp = httpx.post(f"{predictor}/webhooks/mlflow", json=event, headers=sent, timeout=10)
        assert resp.status_code == 401, resp.text
        assert resp.headers["www-authenticate"].startswith("MLflow-Signature")
    docs = httpx.get(f"{predictor}/docs.json", timeout=10).json()
    assert docs["paths"]["/webhooks/mlflow"]["post"]["security"] == [{"mlflowSignature": []}]


def test_flag_mode_scores_out_of_range_values_and_names_them(
    predictor: str, headers: dict[str, str]
) -> None:
    records = [RECORD, {**RECORD, "age": 1e308, "tenure_months": 10**40}]
    resp = httpx.post(
        f"{predictor}/predict", json={"records": records}, headers=headers, timeout=10
    )
    assert resp.status_code == 200, resp.text
    first, second = resp.json()["predictions"]
    assert first["warnings"] == []
    assert [w.split(":")[0] for w in second["warnings"]] == ["tenure_months", "age"]
    docs = httpx.get(f"{predictor}/docs.json", timeout=10).json()
    body = docs["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    age = body["schema"]["properties"]["records"]["anyOf"][1]["properties"]["age"]
    assert "maximum" not in age["anyOf"][0]  # accepted, so not published as a bound
