"""prefect.yaml against a real Prefect server and worker: the `train` deployment trains a model.

A throwaway workspace gets the flows and prefect.yaml; `prefect deploy --all` runs there
with MLOPS_PROJECT_DIR pointing the pull step at it, so the worker's flow run executes
the pipeline in the workspace and registers into its embedded store (.mlops/).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.servers import Server, clean_env, free_port, http_ok
from tests.workspace import ROOT, Workspace, make_workspace

POOL = "local-process"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    ws = make_workspace(tmp_path_factory.mktemp("prefect") / "ws")
    shutil.copytree(ROOT / "flows", ws.path / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "prefect.yaml", ws.path / "prefect.yaml")
    stub = ws.path / "flows" / "batch_score.py"
    if not stub.exists():  # built separately; `deploy --all` only needs its entrypoint to load
        stub.write_text(
            "from prefect import flow\n\n\n@flow(name='batch_score')\ndef batch_score() -> None:\n"
            "    pass\n"
        )
    return ws


@pytest.fixture(scope="module")
def prefect_env(
    tmp_path_factory: pytest.TempPathFactory, workspace: Workspace
) -> Iterator[dict[str, str]]:
    """A `prefect server start` on a free port (SQLite in a tmp PREFECT_HOME); its env."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = clean_env(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        MLOPS_PROJECT_DIR=str(workspace.path),
    )
    env.pop("MLOPS_HOME", None)
    env.pop("PREFECT__FLOW_RUN_ID", None)
    server = Server(
        "prefect server",
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        log_path=home / "server.log",
        healthy=http_ok(f"http://127.0.0.1:{port}/api/health"),
        env=env,
    )
    with server:
        yield env


def _prefect(env: dict[str, str], cwd: Path, *args: str, timeout: float = 120) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "prefect", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"prefect {' '.join(args)}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_train_deployment_registers_a_model_version_in_the_workspace(
    workspace: Workspace, prefect_env: dict[str, str], tmp_path: Path
) -> None:
    _prefect(prefect_env, workspace.path, "work-pool", "create", POOL, "--type", "process")
    out = _prefect(prefect_env, workspace.path, "--no-prompt", "deploy", "--all")
    for name in ("train/train", "batch_score/batch_score", "retrain/retrain", "promote/promote"):
        assert name in out
    automations = _prefect(prefect_env, workspace.path, "automation", "ls")
    assert "mlops.drift.detected" in automations, automations

    health_port = free_port()
    worker_env = prefect_env | {
        "PREFECT_WORKER_WEBSERVER_PORT": str(health_port),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
    }
    worker = Server(
        "prefect worker",
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--with-healthcheck"],
        log_path=tmp_path / "worker.log",
        healthy=http_ok(f"http://127.0.0.1:{health_port}/health"),
        env=worker_env,
        cwd=tmp_path,
    )
    with worker:
        out = _prefect(
            prefect_env,
            tmp_path,
            "deployment",
            "run",
            "train/train",
            "--watch",
            "--watch-timeout",
            "150",
            timeout=180,
        )
    assert "Completed" in out, out

    store = workspace.path / ".mlops" / "mlflow.db"
    # registry_uri too: an earlier in-process test may have set MLflow's global one.
    client = MlflowClient(tracking_uri=f"sqlite:///{store}", registry_uri=f"sqlite:///{store}")
    versions = client.search_model_versions("name = 'churn-classifier'")
    assert len(versions) == 1
    assert versions[0].tags.get("prefect.flow_run_id")
