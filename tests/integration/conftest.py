"""Real servers for integration tests, one of each per session, on free ports.

`postgres` (a throwaway cluster with database `mlflow`), `s3` (moto_server with the
buckets created) and `mlflow_server` (PostgreSQL backend, artifacts proxied to S3).
Every server is stopped at the end of the session, also when a test or fixture fails;
their logs stay under pytest's basetemp (servers*/).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.localpg import LocalPostgres
from common.store import migrate, roles, tenants
from tests.servers import (
    DVC_BUCKET,
    FAKE_AWS_CREDS,
    MLFLOW_BUCKET,
    VENV_BIN,
    HttpServer,
    S3Endpoint,
    Server,
    clean_env,
    free_port,
    http_ok,
    throwaway_cluster,
)
from tests.workspace import Workspace, make_workspace


@pytest.fixture(scope="session")
def server_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="session")
def postgres() -> Iterator[LocalPostgres]:
    """A throwaway cluster with database `mlflow`; tests may stop and start it."""
    with throwaway_cluster("pg", "mlflow") as pg:
        yield pg


@pytest.fixture(scope="session")
def s3(server_logs: Path) -> Iterator[S3Endpoint]:
    """moto_server on a free port with the MLflow and DVC buckets."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = Server(
        "moto_server",
        [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        log_path=server_logs / "moto.log",
        healthy=http_ok(f"{url}/moto-api/"),
        env=clean_env(),
    )
    with server.start():
        endpoint = S3Endpoint(url, dict(FAKE_AWS_CREDS))
        for bucket in (MLFLOW_BUCKET, DVC_BUCKET):
            endpoint.client().create_bucket(Bucket=bucket)
        yield endpoint


@pytest.fixture(scope="session")
def mlflow_server(
    postgres: LocalPostgres, s3: S3Endpoint, server_logs: Path
) -> Iterator[HttpServer]:
    """`mlflow server` on PostgreSQL, proxying artifacts to the moto bucket (one worker)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = server_logs / "mlflow.log"
    cmd = [
        str(VENV_BIN / "mlflow"),
        "server",
        *("--backend-store-uri", postgres.url("mlflow", driver="psycopg")),
        *("--artifacts-destination", f"s3://{MLFLOW_BUCKET}/", "--serve-artifacts"),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
    ]
    env = clean_env(
        MLFLOW_S3_ENDPOINT_URL=s3.url,
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        **s3.creds,
    )
    server = Server("mlflow server", cmd, log_path=log, healthy=http_ok(f"{url}/health"), env=env)
    with server.start():
        yield HttpServer(url, log)


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory: pytest.TempPathFactory, mlflow_server: HttpServer) -> Workspace:
    """A workspace where the whole pipeline ran once against the server (champion v1)."""
    ws = make_workspace(
        tmp_path_factory.mktemp("pipeline"), env={"MLFLOW_TRACKING_URI": mlflow_server.url}
    )
    ws.run("dvc", "repro", timeout=600)
    return ws


@pytest.fixture
def jobs_db(postgres: LocalPostgres) -> dict[str, str]:
    """A migrated database of its own with tenants a-1 and b; URLs of the owner (admin),
    the predictor's role and the workers' role."""
    postgres.start()
    name = f"jobs_{uuid.uuid4().hex[:12]}"
    postgres.create_database(name)
    admin = postgres.url(name)
    migrate(admin)
    for role in roles.SERVICE_ROLES:
        roles.enable_login(admin, role)
    for tenant in ("a-1", "b"):
        tenants.add_tenant(admin, tenant)
    return {
        "admin": admin,
        "predictor": roles.role_url(admin, roles.PREDICTOR),
        "worker": roles.role_url(admin, roles.WORKER),
    }
