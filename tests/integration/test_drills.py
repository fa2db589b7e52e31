"""Outage drills: a steady client on /predict, /feedback and /jobs while one process dies.

The stack is real processes: the session's PostgreSQL (MLflow's), moto as the S3 endpoint
and `mlflow server` (conftest.py), a prediction log on a cluster of its own and `bentoml
serve` with 2 workers on a copy of the pipeline's champion. One at a time, under
`tests.steady.SteadyClient`: SIGKILL one predictor worker, stop the log's PostgreSQL for
5 s, SIGKILL MLflow, SIGKILL the S3 endpoint; each comes back on the same port (and data
directory). After each: every acknowledged prediction, label and job is in PostgreSQL
exactly once, and no request failed except while the process was down (plus a short
settle). The session's MLflow and moto are relaunched from their own command line and
environment, so later tests of the session find them as they were (moto's buckets are
put back from a copy taken before the kill: it keeps them in memory only).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from mlflow.tracking import MlflowClient

from common.localpg import LocalPostgres
from tests.integration.serving import api_key, predictor_database, register_copies, serve_predictor
from tests.integration.test_predictor import RECORD
from tests.processes import kill_group
from tests.servers import HttpServer, S3Endpoint, Server, http_ok, throwaway_cluster
from tests.steady import Check, Rates, SteadyClient, check, serve_family
from tests.workspace import Workspace

SERVED = "churn-drills"
RECORDS = [RECORD, {**RECORD, "contract_type": "two_year", "tenure_months": 60}]
RATES = Rates(
    predict=20.0,
    records_per_predict=20,
    feedback_share=0.05,
    jobs=1.0,
    records_per_job=5,
    threads=4,
)
"""400 rows/s: a worker killed at any moment has acknowledged rows it has not written yet."""
BEFORE = 4.0
"""Seconds of traffic before the process goes: every worker has answered and logged."""
AFTER = 8.0
"""Seconds of traffic once it is back; failures in the first SETTLE of them are allowed."""
SETTLE = 3.0
DOWN = 5.0


@pytest.fixture(scope="module")
def registry(mlflow_server: HttpServer, pipeline: Workspace) -> MlflowClient:
    """`churn-drills` v1 and v2 (copies of the pipeline's champion), champion -> v1."""
    return register_copies(mlflow_server.url, SERVED)


@pytest.fixture(scope="module")
def logdb() -> Iterator[LocalPostgres]:
    """The prediction log's own cluster: its drill leaves MLflow's database alone."""
    with throwaway_cluster("drills", "predictions") as pg:
        yield pg


@pytest.fixture(scope="module")
def urls(logdb: LocalPostgres) -> tuple[str, str]:
    """The log database as its owner and as the predictor's role."""
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
        "MODEL_POLL_SECONDS": "1",
        "DATABASE_URL": urls[1],
    }
    with serve_predictor(tmp_path_factory.mktemp("drills"), env) as url:
        yield url


@pytest.fixture(scope="module")
def key(urls: tuple[str, str]) -> str:
    return api_key(urls[0])


@pytest.fixture(scope="session")
def relaunched() -> Iterator[list[Server]]:
    """Servers a drill brought back in place of a session fixture's: stopped at the end."""
    servers: list[Server] = []
    yield servers
    for server in servers:
        server.stop()


def drill(predictor: str, key: str, admin_url: str, name: str, outage: Callable[[], None]) -> Check:
    """Steady traffic; `outage()` takes `name` away and brings it back; the check after."""
    with SteadyClient(predictor, key, RECORDS, RATES) as client:
        client.pause(BEFORE)
        with client.outage(name):
            outage()
        back = client.now()
        client.pause(AFTER)
    result = check(client, admin_url, settle=SETTLE)
    print(f"{name}: {result.summary()}")  # shown with -rA
    answered_after = [o for o in client.outcomes if o.kind == "predict" and o.ok and o.at > back]
    assert answered_after, f"no prediction answered after {name} came back: {result.summary()}"
    return result


def _clients(worker: psutil.Process, url: str) -> int:
    """Connections to `url` the worker is serving (the kernel spreads them on accept)."""
    port = int(url.rsplit(":", 1)[1])
    return sum(
        c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port
        for c in worker.net_connections("tcp")
    )


def _group_leader(url: str) -> psutil.Process:
    """The leader of the process group listening on `url`'s port (a fixture's Server)."""
    port = int(url.rsplit(":", 1)[1])
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            assert conn.pid is not None, f"cannot see who listens on {port}"
            return psutil.Process(os.getpgid(conn.pid))
    raise AssertionError(f"nothing listens on port {port}")


def _kill_group(leader: psutil.Process, port: int) -> None:
    """SIGKILL the whole group; wait until the port is free again."""
    kill_group(leader.pid)
    deadline = time.monotonic() + 30
    while any(
        c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
        for c in psutil.net_connections(kind="tcp")
    ):
        assert time.monotonic() < deadline, f"port {port} still taken after SIGKILL"
        time.sleep(0.2)


def _relaunch(
    leader: psutil.Process, name: str, log_path: Path, healthy: Callable[[], bool]
) -> Server:
    """A Server running what `leader` ran: same command line, environment and directory."""
    return Server(
        name,
        leader.cmdline(),
        log_path=log_path,
        healthy=healthy,
        env=leader.environ(),
        cwd=Path(leader.cwd()),
    )


def test_a_killed_predictor_worker_loses_no_acknowledged_row(
    predictor: str, key: str, urls: tuple[str, str]
) -> None:
    def kill_one_worker() -> None:
        _, workers = serve_family(predictor)
        assert len(workers) == 2, [w.cmdline() for w in workers]
        # one the client is talking to, with rows in hand
        victim = max(workers, key=lambda w: _clients(w, predictor))
        assert _clients(victim, predictor), "no client connection on either worker"
        victim.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:  # back when the arbiter has started a new one in its place
            _, now = serve_family(predictor)
            if len(now) == 2 and victim.pid not in {w.pid for w in now}:
                break
            assert time.monotonic() < deadline, "the killed worker was not replaced"
            time.sleep(0.2)
        while not http_ok(f"{predictor}/readyz")():
            assert time.monotonic() < deadline, "the predictor is not ready again"
            time.sleep(0.2)

    result = drill(predictor, key, urls[0], "predictor worker", kill_one_worker)
    assert result.clean, result.summary()


def test_a_stopped_database_loses_no_acknowledged_row(
    predictor: str, key: str, urls: tuple[str, str], logdb: LocalPostgres
) -> None:
    def stop_postgres() -> None:
        logdb.stop(mode="immediate")
        time.sleep(DOWN)
        logdb.start()  # same port, same data directory

    result = drill(predictor, key, urls[0], "postgres", stop_postgres)
    assert result.clean, result.summary()


def test_a_killed_mlflow_server_fails_no_request(
    predictor: str,
    key: str,
    urls: tuple[str, str],
    mlflow_server: HttpServer,
    relaunched: list[Server],
) -> None:
    leader = _group_leader(mlflow_server.url)

    def kill_mlflow() -> None:
        port = int(mlflow_server.url.rsplit(":", 1)[1])
        again = _relaunch(
            leader, "mlflow server", mlflow_server.log_path, http_ok(f"{mlflow_server.url}/health")
        )
        _kill_group(leader, port)
        time.sleep(DOWN)
        relaunched.append(again.start())

    result = drill(predictor, key, urls[0], "mlflow", kill_mlflow)
    assert result.clean, result.summary()
    assert not result.failures, result.summary()  # serving never needed it


def _objects(s3: S3Endpoint) -> dict[str, dict[str, bytes]]:
    """Every object of every bucket: what moto would lose with its process."""
    client = s3.client()
    buckets = [b["Name"] for b in client.list_buckets()["Buckets"]]
    return {
        bucket: {
            key: client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in s3.keys(bucket)
        }
        for bucket in buckets
    }


def _put_back(s3: S3Endpoint, objects: dict[str, dict[str, bytes]]) -> None:
    client = s3.client()
    for bucket, content in objects.items():
        client.create_bucket(Bucket=bucket)
        for key, body in content.items():
            client.put_object(Bucket=bucket, Key=key, Body=body)


def test_a_killed_s3_endpoint_fails_no_request_and_the_new_version_loads_after(
    predictor: str,
    *,
    key: str,
    urls: tuple[str, str],
    s3: S3Endpoint,
    registry: MlflowClient,
    server_logs: Path,
    relaunched: list[Server],
) -> None:
    """S3 is needed only to load a new version: the alias moves while it is away."""
    leader = _group_leader(s3.url)
    saved = _objects(s3)

    def kill_s3() -> None:
        port = int(s3.url.rsplit(":", 1)[1])
        again = _relaunch(
            leader, "moto_server", server_logs / "moto.log", http_ok(f"{s3.url}/moto-api/")
        )
        _kill_group(leader, port)
        registry.set_registered_model_alias(SERVED, "champion", "2")
        time.sleep(DOWN)  # the workers try to load v2 meanwhile, and keep serving v1
        relaunched.append(again.start())
        _put_back(s3, saved)

    result = drill(predictor, key, urls[0], "s3", kill_s3)
    assert result.clean, result.summary()
    assert not result.failures, result.summary()
    assert _serves(predictor, key, "2", within=60), "v2 never served once S3 was back"


def _serves(url: str, key: str, version: str, within: float) -> bool:
    """Whether answers come from `version` within `within` seconds (both workers poll)."""
    deadline = time.monotonic() + within
    seen: set[Any] = set()
    with httpx.Client(timeout=10, headers={"authorization": f"Bearer {key}"}) as client:
        while time.monotonic() < deadline:
            versions = {
                client.post(f"{url}/predict", json={"records": RECORD}).json().get("model_version")
                for _ in range(10)
            }
            if versions == {version}:
                return True
            seen |= versions
            time.sleep(1)
    return False
