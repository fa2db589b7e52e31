"""prefect.yaml against a real Prefect server and worker: `pipeline` trains, `batch_score` scores.

A throwaway workspace gets the flows and prefect.yaml; `prefect deploy --all` runs there
with MLOPS_PROJECT_DIR pointing the pull step at it, so the worker's flow runs execute in
the workspace: `pipeline` runs every dvc.yaml stage and registers into its embedded store (.mlops/),
then `batch_score` scores a file with that champion into the workspace's data/scored/ and
the prediction log (DATABASE_URL, a database in the session's PostgreSQL, reaches the flow
runs through the worker's environment).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import psycopg
import pytest
from mlflow.tracking import MlflowClient

from common.localpg import LocalPostgres
from flows.monitor import DRIFT_EVENT
from models.generate import generate
from tests.integration.test_monitor_flow import Webhook
from tests.servers import (
    Server,
    free_port,
    http_ok,
    log_tail,
    prefect_cli,
    prefect_server,
    run_ok,
)
from tests.workspace import Workspace, add_deployments, make_workspace

POOL = "local-process"
BATCH_ROWS = 2_000


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    ws = make_workspace(tmp_path_factory.mktemp("prefect") / "ws")
    add_deployments(ws)
    return ws


@pytest.fixture(scope="module")
def logdb(postgres: LocalPostgres) -> str:
    postgres.create_database("deploylog")
    return postgres.url("deploylog")


@pytest.fixture(scope="module")
def prefect_env(
    tmp_path_factory: pytest.TempPathFactory, workspace: Workspace
) -> Iterator[dict[str, str]]:
    """A `prefect server start` on a free port (SQLite in a tmp PREFECT_HOME); its env."""
    with prefect_server(
        tmp_path_factory.mktemp("prefect-home"),
        MLOPS_PROJECT_DIR=str(workspace.path),
        PREFECT_WORK_POOL=POOL,  # prefect.yaml's `{{ $PREFECT_WORK_POOL }}`, as make deploy sets it
    ) as env:
        yield env


@pytest.fixture(scope="module")
def deployed(workspace: Workspace, prefect_env: dict[str, str]) -> str:
    """The work pool and every deployment of prefect.yaml; `prefect deploy`'s output."""
    prefect_cli(prefect_env, workspace.path, "work-pool", "create", POOL, "--type", "process")
    return prefect_cli(prefect_env, workspace.path, "--no-prompt", "deploy", "--all")


@pytest.fixture(scope="module")
def worker_log(
    tmp_path_factory: pytest.TempPathFactory,
    deployed: str,
    prefect_env: dict[str, str],
    logdb: str,
) -> Iterator[Path]:
    """A process worker serving the pool; flow runs inherit its environment. Its log."""
    home = tmp_path_factory.mktemp("worker")
    health_port = free_port()
    env = prefect_env | {
        "PREFECT_WORKER_WEBSERVER_PORT": str(health_port),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "DATABASE_URL": logdb,
    }
    worker = Server(
        "prefect worker",
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--with-healthcheck"],
        log_path=home / "worker.log",
        healthy=http_ok(f"http://127.0.0.1:{health_port}/health"),
        env=env,
        cwd=home,
    )
    with worker:
        yield home / "worker.log"


def run_deployment(
    env: dict[str, str], cwd: Path, name: str, *params: str, timeout: int = 600
) -> str:
    """`prefect deployment run <name> -p k=v ... --watch`; its output."""
    args = [arg for param in params for arg in ("-p", param)]
    return prefect_cli(
        env,
        cwd,
        *("deployment", "run", name, *args, "--watch", "--watch-timeout", str(timeout)),
        timeout=timeout + 30,
    )


@pytest.fixture(scope="module")
def trained(worker_log: Path, prefect_env: dict[str, str]) -> str:
    """One run of the `pipeline` deployment (the workspace's first version, champion)."""
    return run_deployment(prefect_env, worker_log.parent, "pipeline/pipeline")


def test_deploy_creates_the_deployments_and_the_drift_trigger(
    deployed: str, prefect_env: dict[str, str], workspace: Workspace
) -> None:
    for name in (
        "pipeline/pipeline",
        "batch_score/batch_score",
        "monitor/monitor",
        "monitor_tenants/monitor_tenants",
        "retrain/retrain",
        "retrain_tenants/retrain_tenants",
        "promote/promote",
        "rollback/rollback",
    ):
        assert name in deployed
    automations = prefect_cli(prefect_env, workspace.path, "automation", "ls")
    assert "mlops.drift.detected" in automations, automations
    api = prefect_env["PREFECT_API_URL"]
    fanout = httpx.get(f"{api}/deployments/name/monitor_tenants/monitor_tenants", timeout=30)
    (schedule,) = fanout.json()["schedules"]
    assert schedule["schedule"]["cron"] == "15 * * * *"  # hourly, as prefect.yaml says
    assert schedule["active"] is False  # paused in test workspaces (add_deployments)
    retrain = httpx.get(f"{api}/deployments/name/retrain/retrain", timeout=30).json()
    assert retrain["global_concurrency_limit"]["limit"] == 2  # per-tenant runs queue for a slot
    assert retrain["concurrency_options"]["collision_strategy"] == "ENQUEUE"


def test_the_pipeline_deployment_registers_a_model_version_in_the_workspace(
    trained: str, workspace: Workspace, worker_log: Path
) -> None:
    assert "Completed" in trained, f"{trained}\n--- worker log ---\n{log_tail(worker_log)}"
    store = workspace.path / ".mlops" / "mlflow.db"
    # registry_uri too: an earlier in-process test may have set MLflow's global one.
    client = MlflowClient(tracking_uri=f"sqlite:///{store}", registry_uri=f"sqlite:///{store}")
    versions = client.search_model_versions("name = 'churn-classifier'")
    assert len(versions) == 1
    assert versions[0].tags.get("prefect.flow_run_id")


@pytest.mark.usefixtures("trained")  # the champion it scores with
def test_batch_score_deployment_scores_a_file_with_the_champion(
    prefect_env: dict[str, str],
    workspace: Workspace,
    worker_log: Path,
    logdb: str,
    tmp_path: Path,
) -> None:
    source = tmp_path / "daily.parquet"
    generate(BATCH_ROWS, seed=31).to_parquet(source)
    out = run_deployment(
        prefect_env,
        tmp_path,
        "batch_score/batch_score",
        f"source={source}",
        "batch_id=deployed",
        timeout=120,
    )
    assert "Completed" in out, f"{out}\n--- worker log ---\n{log_tail(worker_log)}"

    # output_dir defaults to data/scored, in the project directory the pull step moved to
    scored = pd.read_parquet(
        workspace.path / "data" / "scored" / "deployed" / "predictions.parquet"
    )
    assert len(scored) == BATCH_ROWS
    assert set(scored["model_version"]) == {"1"}
    assert set(scored["batch_id"]) == {"deployed"}
    with psycopg.connect(logdb) as conn:
        rows = conn.execute(
            "SELECT model_version, count(*) FROM predictions WHERE batch_id = %s"
            " GROUP BY model_version",
            ["deployed"],
        ).fetchall()
    assert rows == [("1", BATCH_ROWS)]


def _flow_runs(env: dict[str, str], deployment: str) -> list[dict[str, Any]] | None:
    """The deployment's flow runs; None when the (busy) server did not answer in time."""
    api = env["PREFECT_API_URL"]
    flow, name = deployment.split("/")
    try:
        found = httpx.get(f"{api}/deployments/name/{flow}/{name}", timeout=30).json()
        runs = httpx.post(
            f"{api}/flow_runs/filter",
            json={"flow_runs": {"deployment_id": {"any_": [found["id"]]}}},
            timeout=30,
        ).json()
    except httpx.TimeoutException:
        return None
    return list(runs)


@pytest.mark.usefixtures("trained")
def test_the_drift_event_runs_the_retrain_deployment_with_the_report_it_came_from(
    prefect_env: dict[str, str], workspace: Workspace, worker_log: Path
) -> None:
    """What the monitor flow emits over threshold starts `retrain` on the worker."""
    report_run = json.loads((workspace.path / "reports" / "train.json").read_text())["run_id"]
    assert _flow_runs(prefect_env, "retrain/retrain") == []
    prefect_cli(
        prefect_env,
        workspace.path,
        *("event", "emit", DRIFT_EVENT, "--resource-id", "mlops.model.churn-classifier"),
        *("--payload", json.dumps({"mlflow_run_id": report_run, "model_version": "1"})),
    )
    deadline = time.monotonic() + 300
    runs: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        runs = _flow_runs(prefect_env, "retrain/retrain") or runs
        if runs and runs[0]["state_type"] in ("COMPLETED", "FAILED", "CRASHED"):
            break
        time.sleep(2)
    assert len(runs) == 1, runs
    assert runs[0]["parameters"]["monitor_run_id"] == report_run
    assert runs[0]["parameters"]["tenant"] is None  # no tenant named: the shared model
    assert runs[0]["state_type"] == "COMPLETED", log_tail(worker_log)
    store = workspace.path / ".mlops" / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{store}", registry_uri=f"sqlite:///{store}")
    tags = client.get_model_version("churn-classifier", "1").tags
    assert tags["retrain.monitor_run"] == report_run
    assert tags["retrain.trigger"] == DRIFT_EVENT


@pytest.fixture(scope="module")
def pager(deployed: str, prefect_env: dict[str, str], workspace: Workspace) -> Iterator[Webhook]:
    """A paging service stand-in, and the failed-flow-run alert pointed at it (as `make
    deploy` sets it up when MONITOR_WEBHOOK_URL is set)."""
    hook = Webhook()
    env = prefect_env | {"MONITOR_WEBHOOK_URL": hook.url}
    out = run_ok([sys.executable, "-m", "common.flow_alerts"], cwd=workspace.path, env=env)
    assert "automation mlops-flow-run-failed" in out, out
    again = run_ok([sys.executable, "-m", "common.flow_alerts"], cwd=workspace.path, env=env)
    assert again.split("(")[1] == out.split("(")[1]  # applied again: the same automation
    yield hook
    hook.server.shutdown()


def test_a_failed_flow_run_of_any_deployment_pages_the_webhook(
    pager: Webhook, prefect_env: dict[str, str], worker_log: Path, tmp_path: Path
) -> None:
    """A batch_score run on a file that does not exist fails; the automation POSTs it."""
    missing = tmp_path / "no-such-file.parquet"
    args = ["-p", f"source={missing}", "-p", "batch_id=doomed", "--watch", "--watch-timeout", "600"]
    proc = subprocess.run(
        [sys.executable, "-m", "prefect", "deployment", "run", "batch_score/batch_score", *args],
        cwd=tmp_path,
        env=prefect_env,
        capture_output=True,
        text=True,
        timeout=660,
        check=False,
    )
    assert "Failed" in proc.stdout + proc.stderr, proc.stdout + log_tail(worker_log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        pages = [b for b in pager.bodies if b.get("flow") == "batch_score"]
        if pages:
            break
        time.sleep(1)
    assert pages, f"no page for the failed run; got {pager.bodies}"
    (page,) = pages
    assert page["alert"] == "flow-run-failed"
    assert page["state"] == "Failed"
    assert page["deployment"] == "batch_score"
    assert "no-such-file.parquet" in page["message"], page
    assert f"UUID: {page['flow_run_id']}" in proc.stdout  # the run that failed
