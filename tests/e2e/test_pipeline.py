"""The pipeline end to end through `dvc repro`, as `make demo` runs it, on the embedded store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.workspace import Workspace, make_workspace

STAGES = ["registry-target", "generate", "prepare", "validate", "train", "evaluate", "register"]

REGISTRY_STATE = """
import json, mlflow
from common.settings import get_settings
from common import registry
client = registry.connect(get_settings())
name = get_settings().model_name
versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
aliases = {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}
listed = [{"version": str(v.version), "tags": v.tags} for v in versions]
print(json.dumps({"aliases": aliases, "versions": listed}))
"""


def registry_state(ws: Workspace) -> dict[str, object]:
    out = ws.python("-c", REGISTRY_STATE).stdout.strip().splitlines()[-1]
    return dict(json.loads(out))


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return make_workspace(tmp_path_factory.mktemp("e2e") / "ws")


@pytest.fixture(scope="module")
def first_run(ws: Workspace) -> str:
    return ws.run("dvc", "repro").stdout


def test_first_repro_runs_every_stage_in_order(first_run: str) -> None:
    positions = [first_run.index(f"Running stage '{stage}'") for stage in STAGES]
    assert positions == sorted(positions)


def test_first_version_becomes_champion_with_lineage_tags(ws: Workspace, first_run: str) -> None:
    state = registry_state(ws)
    assert state["aliases"] == {"champion": "1"}
    versions = state["versions"]
    assert isinstance(versions, list)
    tags = versions[0]["tags"]
    assert tags["gate.decision"] == "promoted"
    assert tags["gate.reason"] == "no champion yet"
    assert tags["onnx.parity"] == "passed"
    assert len(tags["dvc.train_md5"]) == 32
    assert len(tags["dvc.raw_md5"]) == 32
    assert tags["git.commit"] != "unknown"
    assert json.loads(tags["params.train"])["n_estimators"] == 30
    assert 0.5 < float(tags["metric.roc_auc"]) <= 1.0
    assert tags["alias.champion.set_by"].startswith("register stage")


def test_second_repro_with_nothing_changed_does_nothing(ws: Workspace, first_run: str) -> None:
    out = ws.run("dvc", "repro").stdout
    ran = [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")]
    assert ran == ["registry-target"]  # the one check run every time: the registry is the same
    assert "(unchanged)" in out
    assert len(registry_state(ws)["versions"]) == 1  # type: ignore[arg-type]


def test_dvc_metrics_and_plots_show_the_holdout_results(ws: Workspace, first_run: str) -> None:
    metrics = json.loads(ws.run("dvc", "metrics", "show", "--json").stdout)
    values = metrics[""]["data"]["metrics/holdout.json"]["data"]
    assert set(values) >= {"accuracy", "f1_macro", "roc_auc", "log_loss"}
    plots = ws.run("dvc", "plots", "show", "--json").stdout
    assert "plots/confusion.csv" in plots
    assert "plots/roc.csv" in plots


def test_summary_names_the_version_and_how_to_open_mlflow(ws: Workspace, first_run: str) -> None:
    out = ws.python("-m", "common.summary").stdout
    assert "champion -> v1" in out
    assert "mlflow ui --backend-store-uri sqlite:///" in out


def test_a_worse_model_is_registered_as_challenger_but_not_promoted(
    ws: Workspace, first_run: str
) -> None:
    ws.set_params({"train": {"n_estimators": 2, "max_depth": 1}})
    out = ws.run("dvc", "repro").stdout
    assert "Running stage 'train'" in out
    for unchanged in ("generate", "prepare", "validate"):
        assert f"Running stage '{unchanged}'" not in out
    state = registry_state(ws)
    assert state["aliases"] == {"champion": "1", "challenger": "2"}
    versions = state["versions"]
    assert isinstance(versions, list)
    tags = versions[1]["tags"]
    assert tags["gate.decision"] == "rejected"
    assert "fails the promotion policy" in tags["gate.reason"]
    assert "champion v1" in tags["gate.reason"]


def test_reference_snapshot_and_onnx_travel_with_the_model_version(
    ws: Workspace, first_run: str
) -> None:
    script = (
        "import mlflow, os; from common import registry; from common.settings import get_settings;"
        "registry.connect(get_settings());"
        "p = mlflow.artifacts.download_artifacts('models:/churn-classifier@champion');"
        "print(sorted(os.path.relpath(os.path.join(d, f), p)"
        " for d, _, fs in os.walk(p) for f in fs))"
    )
    listing = ws.python("-c", script).stdout
    for name in (
        "extra_files/model.onnx",
        "extra_files/reference.parquet",
        "MLmodel",
        "input_example.json",
    ):
        assert name in listing
    assert Path(ws.path / "data/prepared/reference.parquet").exists()
