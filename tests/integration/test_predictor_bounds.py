"""Bounded request work in a real `bentoml serve` (2 workers): a burst of big or stalled
bodies gets 413 or 503 with Retry-After, never a 500 or a dead worker, and normal traffic
is answered 200 before and after it.

The server runs with small bounds so a burst is cheap: /predict takes 50 records of 1 KiB
(a body over 55,296 bytes is 413), each worker holds at most 110,000 body bytes and 3 keyed
requests at once. "Stalled" requests are raw sockets that send their headers and a first
piece of the body, then wait: what a slow or malicious client does to hold a worker.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, suppress
from urllib.parse import urlparse

import httpx
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
from tests.integration.test_predictor import RECORD
from tests.servers import HttpServer, throwaway_cluster
from tests.workspace import Workspace

SERVED = "churn-bounds"
LIMIT = 50 * 1024 + 4096
"""/predict's body limit at PREDICT_MAX_BATCH=50, PREDICT_MAX_RECORD_BYTES=1024."""
WORKERS = 2
"""The predictor's worker processes (@bentoml.service(workers=2)): each has its own bounds."""


@pytest.fixture(scope="module")
def registry(mlflow_server: HttpServer, pipeline: Workspace) -> MlflowClient:
    return register_copies(mlflow_server.url, SERVED)


@pytest.fixture(scope="module")
def logdb() -> Iterator[LocalPostgres]:
    with throwaway_cluster("bounds", "predictions") as pg:
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
        "DATABASE_URL": as_predictor,
        "PREDICT_MAX_BATCH": "50",
        "PREDICT_MAX_RECORD_BYTES": "1024",
        "PREDICT_MAX_CONCURRENCY": "3",
        "PREDICT_MAX_INFLIGHT_BYTES": "110000",
    }
    with serve_predictor(tmp_path_factory.mktemp("bounds"), env) as url:
        yield url


@pytest.fixture(scope="module")
def headers(logdb: LocalPostgres) -> dict[str, str]:
    return auth(api_key(logdb.url("predictions")))


def _normal(url: str, headers: dict[str, str], rows: int = 5) -> httpx.Response:
    return httpx.post(
        f"{url}/predict", json={"records": [RECORD] * rows}, headers=headers, timeout=30
    )


def _stall(url: str, headers: dict[str, str], declared: int, stack: ExitStack) -> socket.socket:
    """A /predict request that declares `declared` body bytes, sends 10, and waits."""
    where = urlparse(url)
    sock = stack.enter_context(socket.create_connection((where.hostname, where.port), 10))
    head = [
        "POST /predict HTTP/1.1",
        f"Host: {where.netloc}",
        "Content-Type: application/json",
        f"Content-Length: {declared}",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + b'{"records"')
    return sock


def _answers(socks: list[socket.socket], wait: float = 5.0) -> list[bytes]:
    """What each stalled socket was answered within `wait` seconds (b"": nothing yet)."""
    deadline = time.monotonic() + wait
    answers = [b""] * len(socks)
    while time.monotonic() < deadline:
        for i, sock in enumerate(socks):
            if answers[i]:
                continue
            sock.settimeout(0.05)
            with suppress(TimeoutError):
                answers[i] = sock.recv(4096)
        time.sleep(0.05)
    return answers


def test_bodies_over_a_full_batch_get_413_before_they_are_read(
    predictor: str, headers: dict[str, str]
) -> None:
    big = b'{"records": [' + b" " * (2 * 1024 * 1024) + b"]}"
    declared = {"content-type": "application/json", **headers}

    def send(i: int) -> int:
        if i % 2:  # chunked: no Content-Length, refused at the first byte over
            chunks = (big[j : j + 65536] for j in range(0, len(big), 65536))
            resp = httpx.post(f"{predictor}/predict", content=chunks, headers=declared, timeout=60)
        else:
            resp = httpx.post(f"{predictor}/predict", content=big, headers=declared, timeout=60)
        return resp.status_code

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(send, range(32)))

    assert set(statuses) <= {413, 503}, statuses
    assert statuses.count(413) >= 16
    resp = httpx.post(f"{predictor}/predict", content=big, headers=declared, timeout=60)
    assert f"over the limit of {LIMIT:,} bytes" in resp.json()["error"]
    assert _normal(predictor, headers, rows=50).status_code == 200


def test_stalled_bodies_over_the_bytes_held_get_503_and_free_the_worker_when_gone(
    predictor: str, headers: dict[str, str]
) -> None:
    assert _normal(predictor, headers).status_code == 200
    with ExitStack() as stack:
        # 50,000 declared bytes each: a worker holds two (110,000); both workers, four
        socks = [_stall(predictor, headers, 50_000, stack) for _ in range(10)]
        answers = _answers(socks)
        refused = [a for a in answers if a]
        assert len(refused) >= 10 - 2 * WORKERS
        for answer in refused:
            assert answer.startswith(b"HTTP/1.1 503"), answer
            assert b"retry-after: 1" in answer.lower()
        assert any(b"bytes of request bodies" in a for a in refused)
    _until_free(predictor, headers)


def test_requests_over_the_concurrency_bound_get_503_and_normal_traffic_resumes(
    predictor: str, headers: dict[str, str]
) -> None:
    with ExitStack() as stack:
        socks = [_stall(predictor, headers, 1000, stack) for _ in range(10)]
        answers = _answers(socks)
        refused = [a for a in answers if a]
        assert len(refused) >= 10 - 3 * WORKERS
        for answer in refused:
            assert answer.startswith(b"HTTP/1.1 503"), answer
            assert b"3 requests are in flight in this worker" in answer
    _until_free(predictor, headers)
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda _: _normal(predictor, headers).status_code, range(12)))
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 6


def _until_free(url: str, headers: dict[str, str], timeout: float = 10.0) -> None:
    """Normal requests are answered 200 again once the stalled clients went away."""
    deadline = time.monotonic() + timeout
    while True:
        statuses = {_normal(url, headers).status_code for _ in range(2 * WORKERS)}
        if statuses == {200}:
            return
        assert statuses <= {200, 503}, statuses
        assert time.monotonic() < deadline, "the workers did not free their bounds"
        time.sleep(0.2)
