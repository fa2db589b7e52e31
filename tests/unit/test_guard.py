"""The predictor's ASGI guard: the key first (401/403), 405 on BentoML's routes, 413/415,
MLflow's signature on the webhook, and the real /docs.json."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest
from mlflow.webhooks.delivery import _generate_hmac_signature
from psycopg_pool import ConnectionPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from common.store.tenants import Identity
from models.predict import Schema, record_model
from services.predictor import identity
from services.predictor.guard import RequestGuard
from services.predictor.openapi import PUBLISHED, Contract, document

KEY = "mlops_0123456789abcdef_" + "A" * 43
"""A live key of tenant acme with scope predict (the stand-in database below knows it)."""
AUTH = {"authorization": f"Bearer {KEY}"}

GENERATED: dict[str, Any] = {
    "openapi": "3.0.2",
    "paths": {
        "/livez": {"get": {"responses": {"200": {"description": "ok"}}}},
        "/readyz": {"get": {"responses": {"200": {"description": "ok"}}}},
        "/predict": {
            "post": {
                "responses": {
                    "200": {"description": "ok"},
                    "400": {"description": "BentoML's"},
                    "404": {"description": "BentoML's"},
                    "500": {"description": "BentoML's"},
                },
                "requestBody": {"content": {"application/json": {"schema": {}}}},
            }
        },
        "/feedback": {
            "post": {"operationId": "svc__feedback", "responses": {"200": {"description": "ok"}}}
        },
        "/webhooks/mlflow": {"post": {"responses": {"200": {"description": "ok"}}}},
    },
}
"""The shape of what BentoML generates, reduced to what `document` rewrites."""

SCHEMA = Schema(
    features=(("age", "numeric"), ("region", "categorical")),
    categories={"region": ("north", "south")},
    examples={"age": 41.0, "region": "north"},
    bounds={"age": (18.0, 120.0)},
)


async def echo(request: Request) -> JSONResponse:
    return JSONResponse(await request.json())


async def whoami(request: Request) -> JSONResponse:
    return JSONResponse({"tenant": identity.current().tenant_id, "body": await request.json()})


async def docs(_: Request) -> JSONResponse:
    return JSONResponse(GENERATED)


async def live(_: Request) -> PlainTextResponse:
    return PlainTextResponse("\n")


def authenticate(_pool: Any, key: str) -> Identity | None:
    return Identity("acme", KEY[6:22], frozenset({"predict"})) if key == KEY else None


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setattr(identity, "authenticate", authenticate)
    keys = identity.Keys("postgresql://unused", cast(ConnectionPool[Any], None))
    identity.install(identity.Gate(keys, webhook_secret="s3cret", body_limits={"/jobs": 300}))
    app = Starlette(
        routes=[
            Route("/predict", echo, methods=["POST"]),
            Route("/jobs", echo, methods=["POST"]),
            Route("/feedback", echo, methods=["POST"]),
            Route("/whoami", whoami, methods=["POST"]),
            Route("/webhooks/mlflow", echo, methods=["POST"]),
            Route("/docs.json", docs),
            Route("/livez", live),
        ]
    )
    with TestClient(RequestGuard(app, max_body=100)) as client:
        yield client
    identity.install(None)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_a_wrong_method_on_a_bentoml_route_is_405_with_allow(
    client: TestClient, method: str
) -> None:
    resp = client.request(method, "/livez", json={})
    assert resp.status_code == 405
    assert resp.headers["allow"] == "GET, HEAD"
    assert "not allowed" in resp.json()["error"]
    assert client.get("/livez").status_code == 200


def test_non_json_and_oversized_posts_are_refused(client: TestClient) -> None:
    headers = {"content-type": "text/plain", **AUTH}
    assert client.post("/predict", content=b"{}", headers=headers).status_code == 415
    resp = client.post("/predict", json={"x": "y" * 200}, headers=AUTH)
    assert resp.status_code == 413
    assert "over the limit of 100 bytes" in resp.json()["error"]
    assert client.post("/predict", json={"x": 1}, headers=AUTH).json() == {"x": 1}


def test_a_route_with_its_own_limit_takes_bodies_up_to_it_and_no_more(client: TestClient) -> None:
    fits = {"x": "y" * 250}
    assert client.post("/jobs", json=fits, headers=AUTH).json() == fits
    resp = client.post("/jobs", json={"x": "y" * 400}, headers=AUTH)
    assert resp.status_code == 413
    assert "over the limit of 300 bytes" in resp.json()["error"]
    assert client.post("/predict", json=fits, headers=AUTH).status_code == 413


def test_a_chunked_body_without_content_length_is_cut_off_at_the_limit(
    client: TestClient,
) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"x": "'
        for _ in range(100):
            yield b"y" * 50
        yield b'"}'

    headers = {"content-type": "application/json", **AUTH}
    resp = client.post("/jobs", content=chunks(), headers=headers)
    assert resp.status_code == 413
    assert "request body is over the limit of 300 bytes" in resp.json()["error"]


def test_no_key_is_a_401_before_the_body_is_looked_at(client: TestClient) -> None:
    for content, kind in ((b"{}", "text/plain"), (b"x" * 500, "application/json")):
        resp = client.post("/predict", content=content, headers={"content-type": kind})
        assert resp.status_code == 401
        assert resp.headers["www-authenticate"] == 'Bearer realm="predictor"'
        assert "API key is required" in resp.json()["error"]
    resp = client.post("/predict", json={}, headers={"x-api-key": "mlops_nope"})
    assert resp.status_code == 401
    assert 'error="invalid_token"' in resp.headers["www-authenticate"]


def test_a_key_without_the_scope_is_a_403(client: TestClient) -> None:
    resp = client.post("/feedback", json={}, headers=AUTH)
    assert resp.status_code == 403
    assert resp.headers["www-authenticate"] == (
        'Bearer realm="predictor", error="insufficient_scope", scope="feedback"'
    )


def test_the_app_sees_the_tenant_of_the_key(client: TestClient) -> None:
    resp = client.post("/whoami", json={"tenant_id": "globex"}, headers=AUTH)
    assert resp.json() == {"tenant": "acme", "body": {"tenant_id": "globex"}}


def test_health_needs_no_key(client: TestClient) -> None:
    assert client.get("/livez").status_code == 200


def test_with_a_secret_the_webhook_takes_mlflows_signature_and_nothing_else(
    client: TestClient,
) -> None:
    body = json.dumps({"entity": "model_version_alias", "action": "created"})
    stamp = str(int(time.time()))
    signed = {
        "content-type": "application/json",
        "x-mlflow-delivery-id": "d-1",
        "x-mlflow-timestamp": stamp,
        "x-mlflow-signature": _generate_hmac_signature("s3cret", "d-1", stamp, body),
    }
    resp = client.post("/webhooks/mlflow", content=body, headers=signed)
    assert resp.status_code == 200, resp.text
    tampered = body.replace("created", "deleted")
    assert client.post("/webhooks/mlflow", content=tampered, headers=signed).status_code == 401
    resp = client.post("/webhooks/mlflow", json={}, headers=AUTH)
    assert resp.status_code == 401
    assert resp.headers["www-authenticate"].startswith("MLflow-Signature")


def test_docs_publish_the_served_record_and_the_errors_really_sent(client: TestClient) -> None:
    PUBLISHED.set(Contract(record_model(SCHEMA), 5, ("0", "1")))
    spec = client.get("/docs.json").json()
    predict = spec["paths"]["/predict"]["post"]
    assert sorted(predict["responses"]) == ["200", "400", "401", "403", "413", "415", "503"]
    assert predict["responses"]["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"
    }
    body = predict["requestBody"]["content"]["application/json"]["schema"]
    batch, one = body["properties"]["records"]["anyOf"]
    assert (batch["minItems"], batch["maxItems"]) == (1, 5)
    assert one["required"] == ["age", "region"]
    age = one["properties"]["age"]["anyOf"][0]
    assert (age["minimum"], age["maximum"]) == (18.0, 120.0)
    label = spec["paths"]["/feedback"]["post"]["requestBody"]["content"]["application/json"]
    assert label["schema"]["properties"]["label"]["enum"] == ["0", "1"]
    assert label["schema"]["additionalProperties"] is False  # no body names a tenant
    assert body["additionalProperties"] is False
    assert sorted(spec["paths"]["/feedback"]["post"]["responses"]) == [
        "200",
        "400",
        "401",
        "403",
        "404",
        "413",
        "415",
        "503",
    ]
    link = predict["responses"]["200"]["links"]["Feedback"]
    assert link["operationId"] == "svc__feedback"
    assert link["requestBody"]["request_id"] == "$response.body#/predictions/0/request_id"
    assert "405" in spec["paths"]["/livez"]["get"]["responses"]
    assert "503" in spec["paths"]["/readyz"]["get"]["responses"]


def test_docs_declare_the_key_on_every_operation_but_health(client: TestClient) -> None:
    spec = document(GENERATED, None)
    schemes = spec["components"]["securitySchemes"]
    assert (schemes["bearer"]["type"], schemes["bearer"]["scheme"]) == ("http", "bearer")
    assert (schemes["apiKey"]["in"], schemes["apiKey"]["name"]) == ("header", "X-API-Key")
    for path in ("/predict", "/feedback", "/webhooks/mlflow"):
        operation = spec["paths"][path]["post"]
        assert operation["security"] == [{"bearer": []}, {"apiKey": []}]
        challenge = operation["responses"]["401"]["headers"]["WWW-Authenticate"]
        assert challenge["required"] is True
    for path in ("/livez", "/readyz"):
        assert "security" not in spec["paths"][path]["get"]
        assert "401" not in spec["paths"][path]["get"]["responses"]
    signed = document(GENERATED, None, signed_webhook=True)["paths"]["/webhooks/mlflow"]["post"]
    assert signed["security"] == [{"mlflowSignature": []}]
    assert "403" not in signed["responses"]


def test_document_leaves_the_generated_spec_alone() -> None:
    before = repr(GENERATED)
    document(GENERATED, None)
    assert repr(GENERATED) == before
