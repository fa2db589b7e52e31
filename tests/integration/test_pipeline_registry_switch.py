"""Each registry's pipeline state is its own: pointing the pipeline at another MLflow store
(or another environment) trains and registers there, and a summary tells only what the run
did. Two embedded stores: the workspace's own (A) and a SQLite file elsewhere (B)."""

from __future__ import annotations

import json
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.workspace import Workspace, add_deployments, make_workspace

MODEL = "churn-classifier"

FLOW = """
from flows.pipeline import pipeline
from common import dvc_pipeline
result = pipeline()
print("RESULT " + dvc_pipeline.verdict(result))
"""


def _ran(out: str) -> set[str]:
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}


def _versions(uri: str, name: str = MODEL) -> dict[str, str]:
    """Version -> the MLflow run that made it, in store `uri`."""
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    found = client.search_model_versions(f"name='{name}'")
    return {str(v.version): v.tags.get("mlflow.run_id", "") for v in found}


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Workspace, str, str]:
    """A workspace whose pipeline ran once on its embedded store A; B is another store."""
    ws = make_workspace(tmp_path_factory.mktemp("switch") / "ws")
    add_deployments(ws)
    ws.run("dvc", "repro")
    store_a = f"sqlite:///{ws.path / '.mlops/mlflow.db'}"
    store_b = f"sqlite:///{tmp_path_factory.mktemp('store-b') / 'mlflow.db'}"
    return ws, store_a, store_b


@pytest.fixture(scope="module")
def on_b(stores: tuple[Workspace, str, str]) -> tuple[Workspace, str]:
    """The same checkout's pipeline, run again with MLFLOW_TRACKING_URI on store B."""
    ws, _, store_b = stores
    ws_b = Workspace(ws.path, {"MLFLOW_TRACKING_URI": store_b})
    started = time.time()
    out = ws_b.run("dvc", "repro").stdout
    summary = ws_b.python("-m", "common.summary", "--since", str(started)).stdout
    return ws_b, out + "\n=== summary ===\n" + summary


def test_another_store_trains_and_registers_there_and_leaves_the_first_alone(
    stores: tuple[Workspace, str, str], on_b: tuple[Workspace, str]
) -> None:
    ws, store_a, store_b = stores
    out = on_b[1]

    assert {"registry-target", "train", "evaluate", "register"} <= _ran(out)
    assert not {"generate", "prepare", "validate"} & _ran(out)  # same data: not redone
    run_id = json.loads((ws.path / "reports/train.json").read_text())["run_id"]
    assert _versions(store_b) == {"1": run_id}
    assert list(_versions(store_a)) == ["1"]
    assert _versions(store_a)["1"] != run_id


def test_the_summary_describes_the_run_on_the_new_store(on_b: tuple[Workspace, str]) -> None:
    summary = on_b[1].split("=== summary ===")[1]
    assert "promoted: no champion yet" in summary
    assert "champion -> v1" in summary
    assert "store-b" in summary  # where it was registered: B, not the workspace's store


def test_a_report_from_another_store_is_refused_not_told_as_this_ones(
    stores: tuple[Workspace, str, str], on_b: tuple[Workspace, str]
) -> None:
    ws, store_a, _ = stores  # the reports are B's now; A's v1 came from another run
    proc = Workspace(ws.path, {"MLFLOW_TRACKING_URI": store_a}).python(
        "-m", "common.summary", check=False
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert f"v1 registered in {MODEL} (dev) in sqlite:///" in proc.stderr
    assert f"is not in {MODEL} (dev) in {store_a}" in proc.stderr


def test_a_rerun_on_the_same_store_skips_and_says_unchanged(
    stores: tuple[Workspace, str, str], on_b: tuple[Workspace, str]
) -> None:
    store_b = stores[2]
    ws_b = on_b[0]
    before = _versions(store_b)

    out = ws_b.python("-c", FLOW).stdout

    result = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert result, out
    assert result[0].startswith("RESULT unchanged: ")
    assert "registered by an earlier run in churn-classifier (dev) in" in result[0]
    assert "promoted to" not in result[0]
    assert _versions(store_b) == before
    started = time.time()
    summary = ws_b.python("-m", "common.summary", "--since", str(started)).stdout
    assert "unchanged since" in summary
    assert "promoted:" not in summary


def test_another_environment_registers_its_own_model(
    stores: tuple[Workspace, str, str], on_b: tuple[Workspace, str]
) -> None:
    ws, _, store_b = stores
    staging = Workspace(ws.path, {"MLFLOW_TRACKING_URI": store_b, "MLOPS_ENV": "staging"})

    out = staging.run("dvc", "repro").stdout

    assert {"train", "register"} <= _ran(out)
    assert list(_versions(store_b, f"{MODEL}-staging")) == ["1"]
    report = json.loads((ws.path / "reports/register.json").read_text())
    assert report["model_name"] == f"{MODEL}-staging"
