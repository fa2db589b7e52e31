"""The monitor flow in the full-stack topology: MLflow server (Postgres + S3), a Postgres
prediction log, an Evidently workspace, and a paging webhook (the one thing mocked: it is
outside the system).
"""

from __future__ import annotations

import json
import shutil
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest

from common.localpg import LocalPostgres
from tests.servers import free_port
from tests.workspace import ROOT, Workspace

pytestmark = pytest.mark.integration

# Runs in the workspace: score generated rows with the champion, log them as the service
# would (labels for half of them), then run the monitor flow over exactly those rows.
SCRIPT = """
import json, math, sys, time, uuid
from datetime import UTC, datetime, timedelta
import mlflow
from common import registry
from common.params import load_params
from common.store import Feedback, Prediction, connect, create_staging, migrate, write_items
from common.settings import get_settings
from flows.monitor import monitor
from models.data import model_frame
from models.generate import Drift, generate

rows, drifted = int(sys.argv[1]), sys.argv[2] == "drift"
settings, data = get_settings(), load_params().data
registry.connect(settings)
model = mlflow.sklearn.load_model(f"models:/{settings.model_name}@champion")
drift = Drift(covariate={"tenure_months": -1.0, "monthly_charges": 1.0}, concept=1.0)
df = generate(rows, seed=5, drift=drift if drifted else None)
proba = model.predict_proba(model_frame(df, data))[:, 1]
start = datetime.now(UTC)
items = []
for i, (rec, p1) in enumerate(zip(df[data.feature_names].to_dict(orient="records"), proba)):
    rid = str(uuid.uuid4())
    inputs = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in rec.items()}
    items.append(Prediction(rid, start + timedelta(microseconds=i), settings.model_name, "1",
                            inputs, str(int(p1 >= 0.5)), {"0": 1 - p1, "1": float(p1)}, 1.0,
                            "default"))
    if i % 2 == 0:
        label = str(df.loc[i, data.target])
        items.append(Feedback(rid, label, start + timedelta(days=1), "default"))
migrate(settings.database_url)
with connect(settings.database_url) as conn:
    create_staging(conn)
    write_items(conn, items)
end = start + timedelta(seconds=1)
out = monitor(window_hours=1 / 3600, end=end)
print(json.dumps(out.payload()))
"""


class Webhook:
    """A paging service stand-in: records every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["content-length"])
                hook.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.server.shutdown()


@pytest.fixture(scope="module")
def monitored(
    pipeline: Workspace,
    postgres: LocalPostgres,
    webhook: Webhook,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Workspace, str, Path]:
    shutil.copytree(
        ROOT / "flows",
        pipeline.path / "flows",
        ignore=shutil.ignore_patterns("__pycache__"),
        dirs_exist_ok=True,
    )
    name = f"monitor_{uuid.uuid4().hex[:8]}"
    postgres.start()
    postgres.create_database(name)
    evidently = tmp_path_factory.mktemp("evidently")
    env = pipeline.env | {
        "DATABASE_URL": postgres.url(name),
        "MONITOR_WEBHOOK_URL": webhook.url,
        "EVIDENTLY_WORKSPACE": str(evidently),
        "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-home")),
    }
    return Workspace(pipeline.path, env), postgres.url(name), evidently


def run_monitor(ws: Workspace, rows: int, kind: str) -> dict[str, Any]:
    out = ws.python("-c", SCRIPT, str(rows), kind).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def test_a_window_with_too_few_rows_decides_nothing_and_alerts_nobody(
    monitored: tuple[Workspace, str, Path], webhook: Webhook
) -> None:
    ws, url, _ = monitored
    before = len(webhook.bodies)
    out = run_monitor(ws, 400, "calm")
    assert out["enough_rows"] is False
    assert out["drift_detected"] is False
    assert "too few rows" in out["summary"]
    assert len(webhook.bodies) == before
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT enough_rows, current_rows FROM monitoring_runs WHERE run_id = %s",
            [out["run_id"]],
        ).fetchone()
    assert row == (False, 400)


def test_drift_is_reported_kept_and_paged(
    monitored: tuple[Workspace, str, Path], webhook: Webhook
) -> None:
    ws, url, evidently = monitored
    out = run_monitor(ws, 3000, "drift")

    assert out["drift_detected"] is True
    assert out["labelled_rows"] == 1500
    # the page: one POST naming the event, the version and where the report is
    page = webhook.bodies[-1]
    assert page["event"] == "mlops.drift.detected"
    assert page["model_version"] == "1"
    assert page["mlflow_run_id"] == out["mlflow_run_id"]
    assert set(page) == {"event", *out}  # the flow's printed outcome is the page's payload
    assert set(out) == {
        "run_id",
        "model_name",
        "model_version",
        "window_start",
        "window_end",
        "current_rows",
        "labelled_rows",
        "enough_rows",
        "drift_detected",
        "share_drifted",
        "summary",
        "mlflow_run_id",
        "report_uri",
        "evidently_project",
        "tenant_id",  # None: the shared model, over every tenant's traffic
        "alerted",
    }
    # the report: HTML and JSON in the MLflow run, served from S3 through the server
    listed = ws.python(
        "-c",
        "import sys, mlflow; from mlflow import MlflowClient; "
        "print([f.path for f in MlflowClient().list_artifacts(sys.argv[1], 'monitoring')])",
        out["mlflow_run_id"],
    ).stdout
    for name in ("report.html", "report.json", "summary.json"):
        assert f"monitoring/{name}" in listed
    # the headline numbers in Postgres, per feature, chartable over time
    with psycopg.connect(url) as conn:
        metrics: dict[str, float] = dict(
            conn.execute(
                "SELECT metric || ':' || column_name, value FROM monitoring_metrics"
                " WHERE run_id = %s",
                [out["run_id"]],
            ).fetchall()
        )
    assert metrics["dataset_drift:"] in (0.0, 1.0)
    assert metrics["drifted:tenure_months"] == 1.0
    assert metrics["labelled_rows:"] == 1500
    assert "accuracy:" in metrics
    # the Evidently workspace: the project with this window's snapshots
    project = evidently / out["evidently_project"]
    assert len(list((project / "snapshots").glob("*.json"))) >= 2
