"""Progressive delivery on a real `bentoml serve` (2 workers), a real MLflow server and
PostgreSQL: a challenger takes the share of entity keys its weight gives, sticky per key; a
shadow scores a copy that never reaches a client; a steady client sees no failure while the
weight ramps 10 -> 50 -> 100 and while the canary is rolled back, which takes effect within
one alias poll; a challenger that fails to score leaves the champion answering.

`churn-variants` v1 is the champion, v2 the challenger, v3 the shadow (each test sets the
aliases and weight it needs and the `clean` fixture takes them away).
"""

from __future__ import annotations

import concurrent.futures
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import mlflow
import pytest
from mlflow.tracking import MlflowClient

from common.localpg import LocalPostgres
from common.params import load_params
from common.registry import CHALLENGER, variants
from common.registry import rollout as moves
from common.store.connection import connect
from common.store.tenants import DEFAULT_TENANT
from tests.integration.serving import (
    api_key,
    auth,
    predictor_database,
    register_copies,
    serve_predictor,
)
from tests.integration.test_predictor import RECORD
from tests.servers import HttpServer, throwaway_cluster
from tests.unit.test_predict import fitted, save_model_dir, sealed, training_rows
from tests.workspace import ROOT, Workspace

SERVED = "churn-variants"
POLL_SECONDS = 1.0
MARGIN_SECONDS = 1.5
"""A rollback is seen within one poll plus this (a registry search, two workers' clocks)."""
AT = "2026-12-02T00:00:00+00:00"


@pytest.fixture(scope="module")
def registry(mlflow_server: HttpServer, pipeline: Workspace) -> MlflowClient:
    """`churn-variants` v1..v3, the pipeline champion's artifacts; champion -> v1."""
    return register_copies(mlflow_server.url, SERVED, versions=3)


@pytest.fixture(scope="module")
def logdb() -> Iterator[LocalPostgres]:
    with throwaway_cluster("variants", "predictions") as pg:
        yield pg


@pytest.fixture(scope="module")
def urls(logdb: LocalPostgres) -> tuple[str, str]:
    return predictor_database(logdb)


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
        "MODEL_POLL_SECONDS": str(POLL_SECONDS),
        "DATABASE_URL": urls[1],
    }
    with serve_predictor(tmp_path_factory.mktemp("variants"), env) as url:
        yield url


@pytest.fixture(scope="module")
def headers(urls: tuple[str, str]) -> dict[str, str]:
    return auth(api_key(urls[0]))


@pytest.fixture
def clean(registry: MlflowClient, predictor: str, headers: dict[str, str]) -> Iterator[None]:
    """After each test: no challenger, no shadow, weight 0, and the predictor knows it."""
    yield
    weigh(registry, 0)
    for alias in (CHALLENGER, variants.SHADOW):
        if alias in registry.get_registered_model(SERVED).aliases:
            registry.delete_registered_model_alias(SERVED, alias)
    settle(predictor, headers, lambda v: v["challenger"] is None and v["shadow"] is None)


def weigh(client: MlflowClient, weight: float) -> None:
    variants.set_weight(client, SERVED, weight, by="test", reason="test", at=AT)


def settle(
    url: str, headers: dict[str, str], seen: Callable[[dict[str, Any]], bool], n: int = 12
) -> None:
    """Until `n` /model answers in a row (either worker may answer) show `seen` variants."""
    deadline = time.monotonic() + 60
    streak = 0
    while streak < n:
        assert time.monotonic() < deadline, "the predictor never showed the variants asked for"
        info = httpx.get(f"{url}/model/", headers=headers, timeout=30).json()
        streak = streak + 1 if seen(info["variants"]) else 0
        time.sleep(0.05)


def serving(
    alias: str, version: str, weight: float | None = None
) -> Callable[[dict[str, Any]], bool]:
    def seen(v: dict[str, Any]) -> bool:
        about = v[alias]
        ok = about is not None and about["serving"] and about["model_version"] == version
        return ok and (weight is None or v["challenger_weight"] == weight)

    return seen


@dataclass(frozen=True)
class Answer:
    sent: float
    status: int
    variant: str
    version: str
    request_id: str


def ask(client: httpx.Client, url: str, key: str | None = None) -> Answer:
    sent = time.monotonic()
    extra = {variants.ENTITY_HEADER: key} if key is not None else {}
    try:
        resp = client.post(f"{url}/predict", json={"records": RECORD}, headers=extra)
    except httpx.HTTPError as exc:
        return Answer(sent, 0, type(exc).__name__, "", "")
    if resp.status_code != 200:
        return Answer(sent, resp.status_code, resp.text[:200], "", "")
    body = resp.json()
    (one,) = body["predictions"]
    assert (one["variant"], one["model_version"]) == (body["variant"], body["model_version"])
    return Answer(sent, 200, body["variant"], body["model_version"], one["request_id"])


def ask_many(url: str, headers: dict[str, str], keys: list[str]) -> list[Answer]:
    def send(part: list[str]) -> list[Answer]:
        with httpx.Client(timeout=30, headers=headers) as client:
            return [ask(client, url, k) for k in part]

    parts = [keys[i::4] for i in range(4)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = [a for part in pool.map(send, parts) for a in part]
    order = {k: i for i, k in enumerate(k for part in parts for k in part)}
    return [answers[order[k]] for k in keys]


def read_back(url: str, headers: dict[str, str], start: datetime) -> dict[str, str]:
    """GET /predictions from `start` on, every page: request id -> the variant it says."""
    told: dict[str, str] = {}
    cursor: str | None = None
    with httpx.Client(timeout=30, headers=headers) as client:
        while True:
            query: dict[str, Any] = {"start": start.isoformat(), "limit": 1000}
            if cursor is not None:
                query["cursor"] = cursor
            resp = client.get(f"{url}/predictions", params=query)
            assert resp.status_code == 200, resp.text
            page = resp.json()
            told |= {row["request_id"]: row["variant"] for row in page["rows"]}
            cursor = page["next_cursor"]
            if cursor is None:
                return told


def logged(admin: str, sql: str, expected: int, *args: Any) -> list[tuple[Any, ...]]:
    """The rows of `sql` once there are `expected` of them (the log writes off the request)."""
    deadline = time.monotonic() + 30
    while True:
        with connect(admin) as conn:
            rows = conn.execute(sql, args).fetchall()
        if len(rows) >= expected or time.monotonic() > deadline:
            return rows
        time.sleep(0.3)


class SteadyClient:
    """A thread sending one request after another, each with a new entity key."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url, headers), daemon=True)

    def _run(self, url: str, headers: dict[str, str]) -> None:
        with httpx.Client(timeout=30, headers=headers) as client:
            while not self._stop.is_set():
                self.answers.append(ask(client, url, str(uuid.uuid4())))

    def __enter__(self) -> SteadyClient:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def since(self, t: float) -> list[Answer]:
        return [a for a in list(self.answers) if a.sent >= t]


def test_the_challenger_answers_its_share_of_entity_keys_and_each_key_sticks(
    registry: MlflowClient,
    predictor: str,
    headers: dict[str, str],
    urls: tuple[str, str],
    clean: None,
) -> None:
    registry.set_registered_model_alias(SERVED, CHALLENGER, "2")
    weigh(registry, 10)
    settle(predictor, headers, serving("challenger", "2", weight=10))
    start = datetime.now(UTC)
    keys = [f"customer-{i}" for i in range(3000)]
    first = ask_many(predictor, headers, keys)
    again = ask_many(predictor, headers, keys[:1000])
    assert {a.status for a in first + again} == {200}
    expected = [variants.assign(DEFAULT_TENANT, k, 10) for k in keys]
    assert [a.variant for a in first] == expected  # the share assign() gives, key by key
    assert [a.variant for a in again] == expected[:1000]  # the same key, the same variant
    assert abs(Counter(expected)["challenger"] / len(keys) - 0.10) < 0.02
    versions = {a.variant: a.version for a in first}
    assert versions == {"champion": "1", "challenger": "2"}

    told = {a.request_id: a.variant for a in first + again}
    rows = logged(
        urls[0],
        "SELECT request_id::text, variant, model_version FROM predictions"
        " WHERE request_id::text = ANY(%s)",
        len(told),
        list(told),
    )
    assert {rid: variant for rid, variant, _ in rows} == told
    assert all(version == versions[variant] for _, variant, version in rows)
    read = read_back(predictor, headers, start)
    assert {rid: read.get(rid) for rid in told} == told  # GET /predictions says the same


def test_shadow_predictions_are_logged_and_never_reach_a_client(
    registry: MlflowClient,
    predictor: str,
    headers: dict[str, str],
    urls: tuple[str, str],
    clean: None,
) -> None:
    registry.set_registered_model_alias(SERVED, variants.SHADOW, "3")
    settle(predictor, headers, serving("shadow", "3"))
    start = time.time()
    answers = ask_many(predictor, headers, [f"shadowed-{i}" for i in range(400)])
    assert Counter((a.status, a.variant, a.version) for a in answers) == Counter(
        {(200, "champion", "1"): 400}
    )
    shadow = logged(
        urls[0],
        "SELECT request_id::text, model_version FROM predictions"
        " WHERE variant = 'shadow' AND ts >= to_timestamp(%s)",
        400,
        start,
    )
    assert 0 < len(shadow) <= 400  # a copy the shadow fell behind on is dropped, not queued
    assert {version for _, version in shadow} == {"3"}
    assert not {rid for rid, _ in shadow} & {a.request_id for a in answers}


def test_a_steady_client_sees_no_failure_through_a_ramp_and_a_rollback_within_one_poll(
    registry: MlflowClient, predictor: str, headers: dict[str, str], clean: None
) -> None:
    """The ramp and the rollback are the rollout flow's own registry moves
    (common.registry.rollout), as flows/rollout.py makes them."""
    registry.set_registered_model_alias(SERVED, CHALLENGER, "2")
    with SteadyClient(predictor, headers) as steady:
        for weight in (10, 50, 100):
            moves.set_weight(registry, SERVED, weight, by="test", reason=f"step at {weight}%")
            settle(predictor, headers, serving("challenger", "2", weight=weight))
            time.sleep(1)
        assert steady.since(time.monotonic() - 1)
        assert {a.variant for a in steady.since(time.monotonic() - 0.5)} == {"challenger"}

        # the rollback: weight 0, then the alias goes, `rolled back` recorded on v2
        moves.roll_back(registry, SERVED, "2", champion="1", by="test", reason="worse")
        rolled_back = time.monotonic()
        time.sleep(POLL_SECONDS + MARGIN_SECONDS + 1)
    assert [a for a in steady.answers if a.status != 200] == []
    after = steady.since(rolled_back)
    late = [a for a in after if a.variant == "challenger"]
    last = max((a.sent for a in late), default=rolled_back) - rolled_back
    assert last <= POLL_SECONDS + MARGIN_SECONDS, f"challenger answered {last:.2f} s after"
    settled = steady.since(rolled_back + POLL_SECONDS + MARGIN_SECONDS)
    assert settled
    assert {(a.variant, a.version) for a in settled} == {("champion", "1")}


def failing_challenger(client: MlflowClient, tracking_uri: str) -> str:
    """A version trained with `tenure_months` renamed: it loads and checks out on its own
    input example, and fails on every request the champion's contract lets through."""
    params = load_params(ROOT / "params.yaml")
    features = dict(params.data.features)
    features["tenure_months_v2"] = features.pop("tenure_months")
    data = params.data.model_copy(update={"features": features})
    rows = training_rows().rename(columns={"tenure_months": "tenure_months_v2"})
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_model_dir(fitted(rows, data, params), data, rows, Path(tmp) / "model")
        tags = sealed(model_dir)
        mlflow.set_tracking_uri(tracking_uri)
        with mlflow.start_run() as run:
            mlflow.log_artifacts(str(model_dir), "model")
    mv = client.create_model_version(
        SERVED, f"{run.info.artifact_uri}/model", run.info.run_id, tags=tags
    )
    return str(mv.version)


def test_a_challenger_that_fails_to_score_leaves_the_champion_answering(
    registry: MlflowClient,
    predictor: str,
    headers: dict[str, str],
    urls: tuple[str, str],
    clean: None,
) -> None:
    version = failing_challenger(registry, registry.tracking_uri)
    registry.set_registered_model_alias(SERVED, CHALLENGER, version)
    weigh(registry, 100)
    settle(predictor, headers, serving("challenger", version, weight=100))
    start = time.time()
    answers = ask_many(predictor, headers, [f"failing-{i}" for i in range(60)])
    assert Counter((a.status, a.variant, a.version) for a in answers) == Counter(
        {(200, "champion", "1"): 60}
    )
    errors = logged(
        urls[0],
        "SELECT variant, model_version, error FROM serving_errors WHERE ts >= to_timestamp(%s)",
        60,
        start,
    )
    assert len(errors) == 60
    assert {(variant, v) for variant, v, _ in errors} == {("challenger", version)}
    assert all("tenure_months_v2" in error for *_, error in errors)
    text = httpx.get(f"{predictor}/metrics", timeout=30).text
    assert 'predictor_serving_errors_total{model_version="' + version in text
