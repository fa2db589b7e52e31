"""`make up` without Docker: the compose topology as local processes, used for real, then `down`."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import psycopg
import pytest

from scripts.stack import Ports, Stack
from tests.servers import free_port
from tests.workspace import Workspace, make_workspace

RECORD = {
    "tenure_months": 3,
    "monthly_charges": 99.0,
    "total_charges": 297.0,
    "support_tickets_90d": 4,
    "avg_daily_usage_min": 20.0,
    "days_since_last_login": 40,
    "num_products": 1,
    "age": 30,
    "late_payments_12m": 2,
    "satisfaction_score": 3,
    "contract_type": "month_to_month",
    "payment_method": "electronic_check",
    "region": "south",
    "plan_tier": "premium",
}


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    home = Path(tempfile.mkdtemp(prefix="mlops-it-stack-"))
    home.chmod(0o755)  # the postgres program runs as the `postgres` user
    ports = Ports(*(free_port() for _ in range(5)))
    stack = Stack(home / "stack", ports)
    try:
        stack.up()
        yield stack
    finally:
        stack.down()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def trained(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    env = {k: v for k, v in stack.env().items() if k.startswith(("MLFLOW_TRACKING", "PREFECT"))}
    ws = make_workspace(tmp_path_factory.mktemp("stack-ws"), env=env)
    ws.run("dvc", "repro", timeout=600)
    return ws


def test_every_service_is_up_with_the_compose_variables(stack: Stack) -> None:
    status = stack.ctl("status", check=False)
    for name in ("postgres", "s3", "mlflow", "prefect-server"):
        assert f"{name} " in status
        assert "RUNNING" in status.split(f"{name} ")[1].splitlines()[0]
    env = stack.env()
    for name in (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_S3_ENDPOINT_URL",
        "PREFECT_API_URL",
        "DATABASE_URL",
    ):
        assert name in env
    assert httpx.get(f"{env['PREFECT_API_URL']}/health").status_code == 200


def test_pipeline_on_the_stack_then_the_predictor_serves_and_logs(
    stack: Stack, trained: Workspace
) -> None:
    assert stack.serve_if_champion(timeout=120)
    url = f"http://127.0.0.1:{stack.ports.predictor}"
    ids = []
    for _ in range(5):
        resp = httpx.post(f"{url}/predict", json={"records": RECORD}, timeout=30)
        assert resp.status_code == 200, resp.text
        ids.append(resp.json()["predictions"][0]["request_id"])
    with psycopg.connect(stack.pg.url("predictions")) as conn:
        for _ in range(50):
            (n,) = conn.execute(
                "SELECT count(*) FROM predictions WHERE request_id = ANY(%s::uuid[])", (ids,)
            ).fetchone() or (0,)
            if n == len(ids):
                break
            time.sleep(0.2)
    assert n == len(ids)


def test_down_stops_everything_it_started(stack: Stack) -> None:
    pids = [
        int(p) for p in stack.ctl("pid", "all", check=False).split() if p.isdigit() and p != "0"
    ]
    assert pids
    stack.down()
    _, alive = psutil.wait_procs(
        [psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=30
    )
    assert alive == []
    assert not stack.running()
