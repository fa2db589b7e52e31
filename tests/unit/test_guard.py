"""The predictor's ASGI guard: the key first (401/403), 405 on BentoML's routes, 413/415,
MLflow's signature on the webhook, the real /docs.json, and the bounds of work in flight."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any, cast

import httpx
import pytest
from mlflow.webhooks.delivery import _generate_hmac_signature
from psycopg_pool import ConnectionPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from common.settings import Settings
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


# bounded work per worker: requests in flight and bytes of bodies held


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(identity, "authenticate", authenticate)
    keys = identity.Keys("postgresql://unused", cast(ConnectionPool[Any], None))
    identity.install(identity.Gate(keys))
    yield
    identity.install(None)


async def _burst(guard_settings: dict[str, int], bodies: list[bytes]) -> list[httpx.Response]:
    """POST `bodies` at once to a guarded app that answers none until all were sent, then
    one more after they were answered (the last response)."""
    release = asyncio.Event()
    arrived = 0

    async def held(request: Request) -> JSONResponse:
        nonlocal arrived
        arrived += 1
        await release.wait()
        return JSONResponse({"bytes": len(await request.body())})

    app = Starlette(routes=[Route("/predict", held, methods=["POST"])])
    guard = RequestGuard(app, max_body=1 << 20, settings=Settings.model_validate(guard_settings))
    transport = httpx.ASGITransport(app=guard)
    headers = {"content-type": "application/json", **AUTH}
    async with httpx.AsyncClient(transport=transport, base_url="http://guarded") as http:
        calls = [
            asyncio.create_task(http.post("/predict", content=b, headers=headers)) for b in bodies
        ]
        while sum(t.done() for t in calls) + arrived < len(bodies):
            await asyncio.sleep(0.01)
        release.set()
        answers = list(await asyncio.gather(*calls))
        answers.append(await http.post("/predict", content=bodies[0], headers=headers))
    assert guard.in_flight == 0
    assert guard.held == 0
    return answers


def test_requests_over_the_concurrency_bound_get_503_with_retry_after(gate: None) -> None:
    answers = asyncio.run(_burst({"PREDICT_MAX_CONCURRENCY": 2}, [b"{}"] * 5))

    assert sorted(r.status_code for r in answers[:5]) == [200, 200, 503, 503, 503]
    refused = next(r for r in answers if r.status_code == 503)
    assert refused.headers["retry-after"] == "1"
    assert "2 requests are in flight in this worker" in refused.json()["error"]
    assert answers[-1].status_code == 200  # the bound frees as requests end


def test_bodies_over_the_bytes_held_bound_get_503_before_being_read(gate: None) -> None:
    body = json.dumps({"x": "y" * 1500}).encode()
    answers = asyncio.run(_burst({"PREDICT_MAX_INFLIGHT_BYTES": 4096}, [body] * 4))

    assert sorted(r.status_code for r in answers[:4]) == [200, 200, 503, 503]
    refused = next(r for r in answers if r.status_code == 503)
    assert refused.headers["retry-after"] == "1"
    assert "holds 4,096 bytes of request bodies" in refused.json()["error"]
    assert answers[-1].json() == {"bytes": len(body)}


def test_a_body_larger_than_the_worker_may_hold_is_413_not_503(gate: None) -> None:
    app = Starlette(routes=[Route("/predict", echo, methods=["POST"])])
    settings = Settings.model_validate({"PREDICT_MAX_INFLIGHT_BYTES": 2048})
    with TestClient(RequestGuard(app, max_body=1 << 20, settings=settings)) as client:
        resp = client.post("/predict", json={"x": "y" * 3000}, headers=AUTH)
        fits = client.post("/predict", json={"x": "y" * 1000}, headers=AUTH)

    assert resp.status_code == 413
    assert "over the limit of 2,048 bytes" in resp.json()["error"]
    assert fits.status_code == 200


def test_the_predict_limit_is_a_full_batch_of_records() -> None:
    settings = Settings(PREDICT_MAX_BATCH=10, PREDICT_MAX_RECORD_BYTES=1000)

    limits = identity.body_limits(settings)

    assert limits["/predict"] == 10 * 1000 + identity.ENVELOPE_BYTES
    assert limits["/jobs"] == settings.job_max_body_bytes
