"""Bring your own data: a 3-class table with awkward column names, through params.yaml only.

dvc repro (validate, train with ONNX parity, evaluate with plots, register) -> the
champion scores requests keyed by the original column names, in process -> predictions
logged in a real PostgreSQL -> the monitor flow reports drift of every class's probability.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from typing import Any

import pandas as pd
import psycopg
import pytest
import yaml

from common.localpg import LocalPostgres
from tests.penguins import DATA, SPECIES, penguins
from tests.servers import throwaway_cluster
from tests.workspace import ROOT, Workspace, make_workspace

pytestmark = pytest.mark.e2e

# Runs in the workspace: load the champion as the service does, validate and score request
# records keyed by the original column names and log them; then the monitor flow's steps
# (its tasks, without the Prefect engine: a Prefect server start costs minutes on a busy
# machine; tests/integration/test_monitor_flow.py runs the flow itself) on that window.
SCRIPT = """
import json, sys, tempfile, uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
import pandas as pd
from common import evidently_store
from common.params import load_params
from common.settings import get_settings
from common.store import Prediction, connect, create_staging, migrate, monitoring, write_items
from flows import monitor as flow
from models.predict import validate_records

settings, params = get_settings(), load_params()
served = flow.served_version.fn(settings, None, None)
scorer = served.scorer
rows = pd.read_csv(sys.argv[1])
payload = json.loads(rows[[name for name, _ in scorer.features]].to_json(orient="records"))
records = validate_records(served.record, payload, max_batch=len(payload))
scored = scorer.predict(records)
start = datetime.now(UTC)
items = [
    Prediction(str(uuid.uuid4()), start + timedelta(microseconds=i), served.name,
               served.version, record, s.label, s.probabilities, 1.0, "default")
    for i, (record, s) in enumerate(zip(records, scored, strict=True))
]
migrate(settings.database_url)
with connect(settings.database_url) as conn:
    create_staging(conn)
    write_items(conn, items)

window = monitoring.Window(served.name, served.version, start, start + timedelta(seconds=1))
reference = flow.reference_of.fn(served)
current = flow.read_window.fn(settings.database_url, window, params, reference, None)
result = flow.check.fn(reference, current, params)
run_id = monitoring.new_run_id()
with tempfile.TemporaryDirectory() as tmp:
    files = Path(tmp)
    kept = flow.write_report.fn(params, served, window, reference, current, result, files)
    name = evidently_store.project_name(served.name)
    project = None if kept is None else flow.upload_report.fn(settings, served, window, kept, name)
    mlflow_run, report_uri = flow.log_run.fn(
        settings, params, served, window, result, run_id, project, files, None
    )
flow.record.fn(settings.database_url, monitoring.RunRecord(
    run_id, served.name, served.version, window.start, window.end, result.current_rows,
    result.labelled_rows, result.enough_rows, result.drift_detected, result.summary(),
    mlflow_run, report_uri, project), result)
print(json.dumps({"backend": scorer.backend, "classes": scorer.classes,
                  "labels": [s.label for s in scored], "run_id": run_id,
                  "enough_rows": result.enough_rows, "drift_detected": result.drift_detected,
                  "report_uri": report_uri}))
"""


@pytest.fixture(scope="module")
def postgres() -> Iterator[LocalPostgres]:
    with throwaway_cluster("byod", "predictions") as pg:
        yield pg


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, postgres: LocalPostgres) -> Workspace:
    """The project with penguins.csv plugged in through params.yaml, and nothing else."""
    ws = make_workspace(
        tmp_path_factory.mktemp("byod") / "ws",
        {
            "generate": {"rows": 500},  # the example data's stage still runs; nothing reads it
            "train": {"n_estimators": 20},
            "monitor": {"min_rows": 500, "report_rows": 1000},
        },
    )
    params = ws.params() | {"data": DATA}
    (ws.path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (ws.path / "data/raw").mkdir(parents=True)
    penguins(3_000, seed=0).to_csv(ws.path / DATA["path"], index=False)
    ws.run("dvc", "add", DATA["path"])
    shutil.copytree(ROOT / "flows", ws.path / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    ws.env |= {
        "DATABASE_URL": postgres.url("predictions"),
        "EVIDENTLY_WORKSPACE": str(tmp_path_factory.mktemp("evidently")),
    }
    return ws


@pytest.fixture(scope="module")
def repro(ws: Workspace) -> str:
    return ws.run("dvc", "repro", timeout=900).stdout


@pytest.fixture(scope="module")
def served(ws: Workspace, repro: str) -> dict[str, Any]:
    """A window of traffic where Gentoo became common: its probability must drift."""
    traffic = ws.path / "traffic.csv"
    penguins(1_000, seed=1, mix=(0.2, 0.1, 0.7)).to_csv(traffic, index=False)
    out = ws.python("-c", SCRIPT, str(traffic), check=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def test_repro_validates_trains_with_onnx_parity_evaluates_and_registers(
    ws: Workspace, repro: str
) -> None:
    for stage in ("validate", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in repro
    assert "promoted to champion" in repro
    metrics = json.loads((ws.path / "metrics/holdout.json").read_text())
    assert set(metrics) >= {"accuracy", "f1_macro", "roc_auc", "log_loss"}
    assert metrics["roc_auc"] > 0.9
    train = json.loads((ws.path / "reports/train.json").read_text())
    assert train["onnx_parity"] is True


def test_multiclass_roc_and_confusion_show_in_dvc_plots(ws: Workspace, repro: str) -> None:
    roc = pd.read_csv(ws.path / "plots/roc.csv")
    assert list(roc.columns) == ["fpr", "tpr"]
    assert roc.iloc[0].tolist() == [0.0, 0.0]
    assert roc.iloc[-1].tolist() == [1.0, 1.0]
    confusion = pd.read_csv(ws.path / "plots/confusion.csv")
    assert set(confusion["actual"]) == set(SPECIES)
    plots = ws.run("dvc", "plots", "show", "--json").stdout
    assert "plots/roc.csv" in plots
    assert "plots/confusion.csv" in plots


def test_the_champion_scores_requests_keyed_by_the_original_column_names(
    served: dict[str, Any],
) -> None:
    assert served["backend"] == "onnx"
    assert served["classes"] == list(SPECIES)
    assert len(served["labels"]) == 1_000
    assert set(served["labels"]) == set(SPECIES)


def test_monitoring_reports_drift_of_every_class_probability(
    served: dict[str, Any], postgres: LocalPostgres
) -> None:
    assert served["enough_rows"] is True
    with psycopg.connect(postgres.url("predictions")) as conn:
        rows = conn.execute(
            "SELECT metric, column_name, value FROM monitoring_metrics WHERE run_id = %s",
            [served["run_id"]],
        ).fetchall()
    scores = {col: v for metric, col, v in rows if metric == "prediction_drift_score"}
    drifted = {col: v for metric, col, v in rows if metric == "prediction_drifted"}
    assert set(scores) == {"predicted", *(f"proba_{s}" for s in SPECIES)}
    assert drifted["proba_Gentoo"] == 1.0
    assert served["drift_detected"] is True
    assert served["report_uri"].endswith("/monitoring")  # the Evidently report was kept
