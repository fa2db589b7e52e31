"""Tenants' own models on one predictor, over HTTP: each tenant is answered by its own champion.

A real `bentoml serve` (2 workers) on a real MLflow server and PostgreSQL. `acme` and
`globex` have models of their own (`<MODEL_NAME>.<tenant>`, champions v2 and v1);
`initech` has none and gets the shared champion. Every answer and every logged row names
the model and version that answered; moving one tenant's alias under the load of all
three fails no request and leaves the other tenants' versions alone.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from mlflow.tracking import MlflowClient

from common.localpg import LocalPostgres
from common.store.connection import connect
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

SERVED = "churn-own"
EXPECTED = {"acme": (f"{SERVED}.acme", "2"), "globex": (f"{SERVED}.globex", "1")}
EXPECTED["initech"] = (SERVED, "1")
REQUESTS = 1_000


@pytest.fixture(scope="module")
def logdb() -> Iterator[LocalPostgres]:
    with throwaway_cluster("ownmodels", "predictions") as pg:
        yield pg


@pytest.fixture(scope="module")
def urls(logdb: LocalPostgres) -> tuple[str, str]:
    return predictor_database(logdb)


@pytest.fixture(scope="module")
def registry(mlflow_server: HttpServer, pipeline: Workspace) -> MlflowClient:
    """The shared model (champion v1); acme's (v1..v3, champion v2), globex's (champion v1)."""
    client = register_copies(mlflow_server.url, SERVED, versions=1)
    register_copies(mlflow_server.url, f"{SERVED}.acme", versions=3)
    client.set_registered_model_alias(f"{SERVED}.acme", "champion", "2")
    register_copies(mlflow_server.url, f"{SERVED}.globex", versions=1)
    return client


@pytest.fixture(scope="module")
def predictor(
    registry: MlflowClient,
    mlflow_server: HttpServer,
    urls: tuple[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    env = {
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        "MODEL_NAME": SERVED,
        "MODEL_POLL_SECONDS": "1",
        "DATABASE_URL": urls[1],
    }
    with serve_predictor(tmp_path_factory.mktemp("ownmodels"), env) as url:
        yield url


@pytest.fixture(scope="module")
def keys(urls: tuple[str, str]) -> dict[str, str]:
    return {t: api_key(urls[0], t, ("predict", "admin")) for t in EXPECTED}


def answered(client: httpx.Client, url: str) -> tuple[int, str, str]:
    """(status, model name, model version) of one 1-record prediction."""
    try:
        resp = client.post(f"{url}/predict", json={"records": RECORD})
    except httpx.HTTPError as exc:
        return 0, type(exc).__name__, ""
    if resp.status_code != 200:
        return resp.status_code, resp.text[:200], ""
    body: dict[str, Any] = resp.json()
    (one,) = body["predictions"]
    assert (one["model_name"], one["model_version"]) == (body["model_name"], body["model_version"])
    return 200, body["model_name"], body["model_version"]


def test_each_tenant_is_answered_by_its_own_champion_or_the_shared_one(
    predictor: str, keys: dict[str, str], urls: tuple[str, str]
) -> None:
    """1,000 requests per tenant, all three tenants at once, each answer by the right model."""

    def send(tenant: str, n: int) -> Counter[tuple[int, str, str]]:
        with httpx.Client(timeout=30, headers=auth(keys[tenant])) as client:
            return Counter(answered(client, predictor) for _ in range(n))

    per_client = REQUESTS // 4
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        jobs = {(t, i): pool.submit(send, t, per_client) for t in EXPECTED for i in range(4)}
        seen: dict[str, Counter[tuple[int, str, str]]] = {t: Counter() for t in EXPECTED}
        for (tenant, _), job in jobs.items():
            seen[tenant] += job.result()
    for tenant, (name, version) in EXPECTED.items():
        assert seen[tenant] == Counter({(200, name, version): REQUESTS}), tenant

    deadline = time.monotonic() + 30
    while True:  # predictions are logged off the request path
        with connect(urls[0]) as conn:
            rows = conn.execute(
                "SELECT tenant_id, model_name, model_version, count(*) FROM predictions"
                " GROUP BY 1, 2, 3"
            ).fetchall()
        logged = {t: (n, v, c) for t, n, v, c in rows}
        if sum(c for *_, c in logged.values()) >= REQUESTS * len(EXPECTED):
            break
        assert time.monotonic() < deadline, logged
        time.sleep(0.3)
    assert logged == {t: (*EXPECTED[t], REQUESTS) for t in EXPECTED}


def test_model_describes_the_callers_own_model_and_no_other_tenant(
    predictor: str, keys: dict[str, str]
) -> None:
    for tenant, (name, version) in EXPECTED.items():
        resp = httpx.get(f"{predictor}/model/", headers=auth(keys[tenant]), timeout=30)
        assert resp.status_code == 200, resp.text
        info = resp.json()
        assert (info["model_name"], info["model_version"]) == (name, version)
        assert info["tenant_id"] == tenant
        assert info["own_model"] is (tenant != "initech")
        assert info["cache"]["size"] == 32
        assert not {t for t in EXPECTED if t != tenant} & set(resp.text.split('"'))


def test_moving_one_tenants_alias_under_load_fails_no_request_and_keeps_the_others(
    predictor: str, keys: dict[str, str], registry: MlflowClient
) -> None:
    results: dict[str, list[tuple[float, int, str, str]]] = {t: [] for t in EXPECTED}
    stop = threading.Event()

    def traffic(tenant: str) -> None:
        with httpx.Client(timeout=30, headers=auth(keys[tenant])) as client:
            while not stop.is_set():
                results[tenant].append((time.monotonic(), *answered(client, predictor)))

    clients = [threading.Thread(target=traffic, args=(t,)) for t in EXPECTED for _ in range(2)]
    for thread in clients:
        thread.start()
    try:
        time.sleep(1)
        registry.set_registered_model_alias(f"{SERVED}.acme", "champion", "3")
        deadline = time.monotonic() + 20
        while not _settled(results["acme"], "3"):  # both workers swapped
            assert time.monotonic() < deadline, Counter(r[1:] for r in results["acme"][-50:])
            time.sleep(0.2)
        time.sleep(1)
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    for tenant, got in results.items():
        assert got, tenant
        outcomes = Counter(r[1:] for r in got)
        if tenant == "acme":
            assert set(outcomes) <= {(200, f"{SERVED}.acme", "2"), (200, f"{SERVED}.acme", "3")}
            assert got[-1][1:] == (200, f"{SERVED}.acme", "3")
        else:
            assert set(outcomes) == {(200, *EXPECTED[tenant])}, outcomes


def _settled(got: list[tuple[float, int, str, str]], version: str, last: int = 40) -> bool:
    tail = got[-last:]
    return len(tail) == last and all(r[3] == version for r in tail)
