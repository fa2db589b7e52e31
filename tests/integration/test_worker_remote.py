"""The workers past one machine, on a real PostgreSQL with the migrations applied.

KEDA's trigger (infra/kubernetes/worker/scaledobject.yaml) runs its query as the workers' role and
gets the messages of every request queue that role serves. A worker on a second "host" (a
network namespace of its own, joined to this one by a veth pair) drains a tenant's queue
through the database and MLflow listening on the host side of the pair.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.localpg import LocalPostgres
from common.store import connect, jobs, migrate, roles, tenants
from models.generate import generate
from tests.integration.serving import register_copies
from tests.servers import (
    MLFLOW_BUCKET,
    VENV_BIN,
    HttpServer,
    S3Endpoint,
    Server,
    clean_env,
    free_port,
    http_ok,
)
from tests.workspace import ROOT, Workspace

pytestmark = pytest.mark.integration

RECORD = {"tenure_months": 3, "plan": "basic"}


def trigger_query() -> str:
    """The query of the ScaledObject's postgresql trigger, as KEDA sends it."""
    scaled = yaml.safe_load((ROOT / "infra/kubernetes/worker/scaledobject.yaml").read_text())
    (trigger,) = scaled["spec"]["triggers"]
    return str(trigger["metadata"]["query"])


@pytest.fixture
def db(jobs_db: dict[str, str]) -> dict[str, str]:
    """A migrated database with tenants a-1 and b, URLs per role (conftest's jobs_db)."""
    return jobs_db


def depth(url: str) -> Any:
    with connect(url) as conn:
        row = conn.execute(trigger_query()).fetchone()
    assert row is not None
    return row[0]


def test_the_keda_query_counts_every_served_request_queue_held_chunks_included(
    db: dict[str, str],
) -> None:
    assert depth(db["worker"]) == 0  # nothing queued: KEDA keeps zero replicas
    with connect(db["predictor"]) as conn:
        jobs.submit(conn, "a-1", [RECORD] * 25, chunk_records=10)  # 3 chunks
        jobs.submit(conn, "b", [RECORD] * 4, chunk_records=2)  # 2 chunks
    with connect(db["admin"]) as conn:
        # A request queue the workers are not granted is not theirs to count (nor an error).
        conn.execute("SELECT pgmq.create('jobs_req_other')")
        conn.execute("SELECT pgmq.send('jobs_req_other', '{}'::jsonb)")
    assert depth(db["worker"]) == 5
    with connect(db["worker"]) as conn:
        (held,) = jobs.read(conn, "a-1", visibility_timeout=30, limit=1)
        assert depth(db["worker"]) == 5  # a chunk a worker holds is still work to do
        jobs.dead_letter(conn, held, "test")  # acknowledged (into the dead-letter queue)
    assert depth(db["worker"]) == 4
    assert isinstance(depth(db["worker"]), int)  # KEDA scans it into a float64


# -- a worker on a second host ------------------------------------------------------------------


@dataclass(frozen=True)
class SecondHost:
    """A network namespace joined to this host by a veth pair: its own address and routes,
    so what runs in it reaches this host only through `host_addr`, as another machine."""

    name: str
    host_addr: str
    addr: str

    def run(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"ip {' '.join(args)}: {proc.stderr}"


def _free_subnet() -> int:
    """A third octet n with 10.231.n.0/30 on no interface of this host."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True)
    for n in random.Random().sample(range(256), 256):
        if f"10.231.{n}." not in used.stdout:
            return n
    raise RuntimeError("no free 10.231.n.0/30 subnet")


@contextmanager
def second_host() -> Iterator[SecondHost]:
    tag = uuid.uuid4().hex[:8]
    name, outside, inside = f"mlops-it-{tag}", f"vh{tag}", f"vn{tag}"  # names <= 15 chars
    n = _free_subnet()
    host = SecondHost(name, f"10.231.{n}.1", f"10.231.{n}.2")
    try:
        _ip("netns", "add", name)
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", name)
        _ip("addr", "add", f"{host.host_addr}/30", "dev", outside)
        _ip("link", "set", outside, "up")
        _ip("-n", name, "addr", "add", f"{host.addr}/30", "dev", inside)
        _ip("-n", name, "link", "set", inside, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        yield host
    finally:
        # Deleting the namespace deletes its end of the pair, and with it the other end.
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", outside], capture_output=True, check=False)


@contextmanager
def database_on(host: SecondHost, password: str) -> Iterator[LocalPostgres]:
    """A cluster of this test's own listening on the host's end of the pair too, taking
    password logins from the pair's /30; the `predictions` database migrated."""
    base = Path(tempfile.mkdtemp(prefix="mlops-it-remote-"))
    pg = LocalPostgres(
        base,
        free_port(),
        password=password,
        settings={"listen_addresses": f"127.0.0.1,{host.host_addr}", "fsync": "off"},
    )
    try:
        pg.init()
        with (pg.data_dir / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {host.host_addr}/30 scram-sha-256\n")
        pg.start()
        pg.create_database("predictions")
        migrate(pg.url("predictions"))
        yield pg
    finally:
        pg.destroy()


def _unreachable_from(host: SecondHost, port: int) -> bool:
    """Whether 127.0.0.1:`port` (this host's loopback) cannot be reached from `host`."""
    probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)"
    proc = subprocess.run(
        host.run(str(VENV_BIN / "python"), "-c", probe), capture_output=True, check=False
    )
    return proc.returncode != 0


@pytest.mark.skipif(os.geteuid() != 0, reason="a network namespace and a veth pair need root")
def test_a_worker_on_a_second_host_drains_a_tenants_queue_over_the_network(
    pipeline: Workspace,
    mlflow_server: HttpServer,
    postgres: LocalPostgres,
    s3: S3Endpoint,
    tmp_path: Path,
) -> None:
    model = "churn-remote"
    register_copies(mlflow_server.url, model, versions=1)
    features = list(pipeline.params()["data"]["features"])
    records = json.loads(generate(30, seed=11)[features].to_json(orient="records"))
    passwords = {role: secrets.token_urlsafe(16) for role in (roles.PREDICTOR, roles.WORKER)}
    with second_host() as host, database_on(host, secrets.token_urlsafe(16)) as pg:
        admin = pg.url("predictions")
        for role, password in passwords.items():
            roles.enable_login(admin, role, password)
        predictor = roles.role_url(admin, roles.PREDICTOR, passwords[roles.PREDICTOR])
        tenants.add_tenant(admin, "remote")
        with connect(admin) as conn:  # this test's own: who wrote each result, by address
            conn.execute(
                "ALTER TABLE job_results ADD COLUMN written_from inet DEFAULT inet_client_addr()"
            )
        with connect(predictor) as conn:
            submitted = [
                jobs.submit(conn, "remote", records[i : i + 10], chunk_records=4)[0].id
                for i in range(0, len(records), 10)
            ]
        # The registry as the second host sees it: an MLflow server on this host's end of
        # the pair, over the session's backend store and artifact bucket.
        port = free_port()
        url = f"http://{host.host_addr}:{port}"
        registry = Server(
            "mlflow server (veth)",
            [
                *(str(VENV_BIN / "mlflow"), "server"),
                *("--backend-store-uri", postgres.url("mlflow", driver="psycopg")),
                *("--artifacts-destination", f"s3://{MLFLOW_BUCKET}/", "--serve-artifacts"),
                *("--host", host.host_addr, "--port", str(port), "--workers", "1"),
                *("--allowed-hosts", f"{host.host_addr}:{port},{host.host_addr}"),
            ],
            log_path=tmp_path / "mlflow-veth.log",
            healthy=http_ok(f"{url}/health"),
            env=clean_env(
                MLFLOW_S3_ENDPOINT_URL=s3.url,
                MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
                **s3.creds,
            ),
        )
        with registry.start():
            assert _unreachable_from(host, pg.port)  # no way back but the pair
            over_the_pair = admin.replace("127.0.0.1", host.host_addr)
            env = clean_env(
                DATABASE_URL=roles.role_url(over_the_pair, roles.WORKER, passwords[roles.WORKER]),
                MLFLOW_TRACKING_URI=url,
                MODEL_NAME=model,
                # As deployed (compose, Kubernetes): models through the tracking server, not
                # presigned URLs of the bucket, which the second host has no route to.
                MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD="false",
                MLOPS_HOME=str(tmp_path / "remote-home"),
                OMP_NUM_THREADS="1",
            )
            started = time.monotonic()
            proc = subprocess.run(
                host.run(str(VENV_BIN / "python"), "-m", "services.worker", "--idle-exit", "5"),
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=180,
                check=False,
            )
            took = time.monotonic() - started
        assert proc.returncode == 0, proc.stderr[-4000:]
        with connect(predictor) as conn:
            done = [jobs.get(conn, "remote", job_id) for job_id in submitted]
            answers = [
                jobs.results(conn, "remote", job_id, offset=0, limit=100) for job_id in submitted
            ]
        assert [j.status if j else None for j in done] == ["done"] * len(submitted)
        assert [len(a) for a in answers] == [10] * len(submitted)
        assert all(a["model_version"] == "1" for part in answers for a in part)
        with connect(admin) as conn:
            writers = conn.execute("SELECT DISTINCT host(written_from) FROM job_results").fetchall()
        assert writers == [(host.addr,)], writers
        assert took < 120, f"the worker took {took:.0f} s"
