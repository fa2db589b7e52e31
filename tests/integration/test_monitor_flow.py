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


# Runs in the workspace: acme and globex get models of their own (params.yaml `tenants`,
# each `<model>.<tenant>@champion` a copy of the shared champion); acme's traffic drifts,
# globex's does not, both logged in the same window. Each tenant's monitor runs, then the
# retrain the drift event asks for, with a stand-in for the tenant's DVC chain (it would
# train on the test's tenant sources): it registers the new version as challenger, as the
# chain's register stage does.
TENANT_SCRIPT = """
import json, math, shutil, uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
import mlflow, pandas as pd, yaml
from mlflow.exceptions import MlflowException
from prefect import flow
from common import paths, registry
from common.dvc_pipeline import RunSummary
from common.settings import get_settings
from common.store import Feedback, Prediction, connect, create_staging, migrate, write_items
from common.store.tenants import add_tenant
from common.errors import UserError
from common.params import load_params
import flows.monitor as monitor_flow
import flows.retrain as retrain_flow
from models.data import model_frame
from models.generate import Drift, generate

settings = get_settings()
client = registry.connect(settings)
shared = client.get_model_version_by_alias(settings.model_name, "champion")
tenants = ("acme", "globex")
params = yaml.safe_load(Path("params.yaml").read_text())
params["tenants"] = {t: {"source": {"path": f"data/{t}.parquet"}} for t in tenants}
Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
data = yaml.safe_load(Path("params.yaml").read_text())["data"]
target, features = data["target"], list(data["features"])

def new_version(tenant):
    name = registry.model_name(settings, tenant)
    try:
        client.create_registered_model(name)
    except MlflowException:
        pass
    return name, client.create_model_version(
        name, source=shared.source, run_id=shared.run_id,
        model_id=shared.model_id or shared.source.removeprefix("models:/"), tags=shared.tags,
    )

migrate(settings.database_url)
model = mlflow.sklearn.load_model(f"models:/{settings.model_name}@champion")
start = datetime.now(UTC)
items, ids = [], {}
for n, tenant in enumerate(tenants):
    try:
        add_tenant(settings.database_url, tenant)
    except UserError:
        pass
    name, mv = new_version(tenant)
    client.set_registered_model_alias(name, "champion", mv.version)
    holdout = paths.layout(tenant).HOLDOUT
    holdout.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(paths.HOLDOUT, holdout)
    drift = Drift(covariate={"tenure_months": -1.0, "monthly_charges": 1.0}, concept=1.0)
    df = generate(3000, seed=11 + n, drift=drift if tenant == "acme" else None)
    proba = model.predict_proba(model_frame(df, load_params().data))[:, 1]
    ids[tenant] = []
    for i, (rec, p1) in enumerate(zip(df[features].to_dict(orient="records"), proba)):
        rid = str(uuid.uuid4())
        ids[tenant].append(rid)
        inputs = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in rec.items()}
        items.append(Prediction(rid, start + timedelta(microseconds=i), name, mv.version, inputs,
                                str(int(p1 >= 0.5)), {"0": 1 - p1, "1": float(p1)}, 1.0, tenant))
        if i % 2 == 0:
            items.append(Feedback(rid, str(df.loc[i, target]), start + timedelta(days=1), tenant))
with connect(settings.database_url) as conn:
    create_staging(conn)
    write_items(conn, items)

before_champions = {t: client.get_model_version_by_alias(registry.model_name(settings, t),
                    "champion").version for t in tenants}
events = []
monitor_flow.emit_event = lambda **event: events.append(event)
end = start + timedelta(seconds=1)
outcomes = {t: monitor_flow.monitor(window_hours=1 / 3600, end=end, tenant=t).payload()
            for t in tenants}

@flow(name="pipeline")
def tenant_pipeline(project_dir: str = ".", tenant: str | None = None) -> RunSummary:
    name, mv = new_version(tenant)
    client.set_registered_model_alias(name, "challenger", mv.version)
    return RunSummary(name, str(mv.version), False, "kept as challenger", {}, None)

def versions():
    return {t: {str(v.version): dict(v.tags) for v in client.search_model_versions(
        f"name = '{registry.model_name(settings, t)}'")} for t in tenants}

retrain_flow.pipeline = tenant_pipeline
before = versions()
(event,) = events
retrain_flow.retrain(".", event["payload"]["mlflow_run_id"], event["payload"]["tenant_id"])

exported = pd.read_parquet(paths.layout("acme").PRODUCTION / "labelled.parquet")
id_column = data.get("id_column") or "request_id"
after = versions()
new = {t: {v: tags for v, tags in after[t].items() if v not in before[t]} for t in tenants}
champions = {t: str(client.get_model_version_by_alias(registry.model_name(settings, t),
             "champion").version) for t in tenants}
runs = {t: client.get_run(o["mlflow_run_id"]).data.tags.get("mlops.tenant")
        for t, o in outcomes.items()}
print(json.dumps({
    "outcomes": outcomes, "event": {"resource": event["resource"], "payload": event["payload"]},
    "exported": len(exported), "exported_acme_only": set(exported[id_column]) <= set(ids["acme"]),
    "new_versions": new, "champions": champions, "run_tags": runs,
    "champions_before": {t: str(c) for t, c in before_champions.items()},
}, default=str))
"""


def test_drift_in_one_tenants_traffic_names_it_and_retrains_its_model_alone(
    monitored: tuple[Workspace, str, Path],
) -> None:
    ws, url, _ = monitored
    out = json.loads(ws.python("-c", TENANT_SCRIPT).stdout.strip().splitlines()[-1])
    acme, globex = out["outcomes"]["acme"], out["outcomes"]["globex"]

    # each tenant's monitor read its own 3,000 rows of the shared window, nobody else's
    assert (acme["current_rows"], globex["current_rows"]) == (3000, 3000)
    assert (acme["model_name"], globex["model_name"]) == (
        "churn-classifier.acme",
        "churn-classifier.globex",
    )
    assert (acme["drift_detected"], globex["drift_detected"]) == (True, False)
    assert (acme["tenant_id"], globex["tenant_id"]) == ("acme", "globex")
    assert out["run_tags"] == {"acme": "acme", "globex": "globex"}
    assert acme["evidently_project"] != globex["evidently_project"]
    # one event, naming acme in its resource and its payload
    event = out["event"]
    assert event["resource"]["mlops.tenant"] == "acme"
    assert event["resource"]["prefect.resource.id"] == "mlops.tenant.acme"
    assert event["payload"]["tenant_id"] == "acme"
    # acme's retrain learned from acme's labelled rows alone and made a new acme version
    assert out["exported"] == 1500
    assert out["exported_acme_only"] is True
    (new,) = out["new_versions"]["acme"].values()
    assert new["retrain.monitor_run"] == acme["mlflow_run_id"]
    assert new["data.production_rows"] == "1500"
    assert "promote.decision" in new  # judged by the gate on acme's own holdout
    # globex: no new version, same champion
    assert out["new_versions"]["globex"] == {}
    assert out["champions"]["globex"] == out["champions_before"]["globex"]
    # the monitoring rows carry their tenant
    with psycopg.connect(url) as conn:
        tenants = conn.execute(
            "SELECT tenant_id FROM monitoring_runs WHERE run_id = ANY(%s) ORDER BY tenant_id",
            [[acme["run_id"], globex["run_id"]]],
        ).fetchall()
    assert tenants == [("acme",), ("globex",)]
