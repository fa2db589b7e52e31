"""The predictor's ASGI guard: 405 on BentoML's routes, 413/415, and the real /docs.json."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from models.predict import Schema, record_model
from services.predictor.guard import RequestGuard
from services.predictor.openapi import PUBLISHED, Contract, document

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


async def docs(_: Request) -> JSONResponse:
    return JSONResponse(GENERATED)


async def live(_: Request) -> PlainTextResponse:
    return PlainTextResponse("\n")


@pytest.fixture
def client() -> TestClient:
    app = Starlette(
        routes=[
            Route("/predict", echo, methods=["POST"]),
            Route("/docs.json", docs),
            Route("/livez", live),
        ]
    )
    return TestClient(RequestGuard(app, max_body=100))


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
    assert (
        client.post("/predict", content=b"{}", headers={"content-type": "text/plain"}).status_code
        == 415
    )
    resp = client.post("/predict", json={"x": "y" * 200})
    assert resp.status_code == 413
    assert "over the limit of 100 bytes" in resp.json()["error"]
    assert client.post("/predict", json={"x": 1}).json() == {"x": 1}


def test_docs_publish_the_served_record_and_the_errors_really_sent(client: TestClient) -> None:
    PUBLISHED.set(Contract(record_model(SCHEMA), 5, ("0", "1")))
    spec = client.get("/docs.json").json()
    predict = spec["paths"]["/predict"]["post"]
    assert sorted(predict["responses"]) == ["200", "400", "413", "415"]
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
    assert sorted(spec["paths"]["/feedback"]["post"]["responses"]) == [
        "200",
        "400",
        "404",
        "413",
        "415",
    ]
    link = predict["responses"]["200"]["links"]["Feedback"]
    assert link["operationId"] == "svc__feedback"
    assert link["requestBody"]["request_id"] == "$response.body#/predictions/0/request_id"
    assert "405" in spec["paths"]["/livez"]["get"]["responses"]
    assert "503" in spec["paths"]["/readyz"]["get"]["responses"]


def test_document_leaves_the_generated_spec_alone() -> None:
    before = repr(GENERATED)
    document(GENERATED, None)
    assert repr(GENERATED) == before
