"""The monitor flow over a window where a challenger and a shadow were live beside the
champion: each variant judged against its own version's reference, kept per variant in
PostgreSQL, MLflow and the Evidently project, and charted side by side by Grafana's SQL.

Real MLflow server, real PostgreSQL, a local Evidently workspace; a registered model of
its own (MODEL_NAME), so the session's shared `churn-classifier` keeps its one version.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from evidently.ui.workspace import Workspace as EvidentlyWorkspace  # type: ignore[import-untyped]

from common.evidently_store import project_name
from common.localpg import LocalPostgres
from tests.integration.test_evidently_ui import series
from tests.integration.test_monitoring_store import GRAFANA_DASHBOARDS, _grafana_sql
from tests.servers import VENV_BIN, Server, clean_env, free_port, http_ok
from tests.workspace import ROOT, Workspace

pytestmark = pytest.mark.integration

MODEL = "churn-monitor-variants"  # not test_predictor_variants' churn-variants: one server

# Runs once in the workspace: MODEL v1 (champion) is the pipeline's champion; v2
# (challenger, and shadow) is the same pipeline logged with another reference, a holdout
# whose tenure and charges moved, scored by it.
SETUP = """
import shutil, sys, tempfile
from pathlib import Path
import mlflow
from common import registry
from common.params import load_params
from common.settings import get_settings
from models.generate import Drift, generate
from models.train import HOLDOUT_SCORED_FILE, SKOPS_TRUSTED, scored_holdout
from common.registry import trust
from common.registry.tags import MANIFEST_SHA256

source = sys.argv[1]
settings, params = get_settings(), load_params()
client = registry.connect(settings)
name = settings.model_name
shared = client.get_model_version_by_alias(source, "champion")
client.create_registered_model(name)
v1 = client.create_model_version(name, source=shared.source, run_id=shared.run_id,
                                 model_id=shared.model_id or shared.source.removeprefix("models:/"),
                                 tags=shared.tags)
client.set_registered_model_alias(name, "champion", v1.version)
pipeline = mlflow.sklearn.load_model(f"models:/{source}@champion")
files = Path(tempfile.mkdtemp())
extra = registry.download_version(Path(tempfile.mkdtemp()), source, str(shared.version))
for f in (extra / "extra_files").iterdir():
    shutil.copy(f, files / f.name)
moved = generate(3000, seed=21, drift=Drift(covariate={"tenure_months": -1.0,
                                                      "monthly_charges": 1.0}))
scored_holdout(pipeline, moved, params.data, params.monitor).to_parquet(
    files / HOLDOUT_SCORED_FILE)
mlflow.set_experiment("variants")
with mlflow.start_run() as run:
    info = mlflow.sklearn.log_model(
        pipeline, name="model", pyfunc_predict_fn="predict_proba",
        extra_files=[str(f) for f in sorted(files.iterdir())], skops_trusted_types=SKOPS_TRUSTED)
v2 = client.create_model_version(name, source=info.model_uri, run_id=run.info.run_id,
                                 model_id=info.model_id,
                                 tags={MANIFEST_SHA256: trust.seal(client, info.model_id)})
client.set_registered_model_alias(name, "challenger", v2.version)
print(v1.version, v2.version)
"""

# Runs in the workspace per test: log one window's traffic as the predictor would, then
# the monitor flow over exactly that window. argv: the groups as
# `variant:version:rows:labelled:moved`, e.g. `challenger:2:2000:1:1`.
TRAFFIC = """
import json, math, sys, uuid
from datetime import UTC, datetime, timedelta
import mlflow
from common import registry
from common.params import load_params
from common.settings import get_settings
from common.store import Feedback, Prediction, connect, create_staging, migrate, write_items
import flows.monitor as monitor_flow
from models.data import model_frame
from models.generate import Drift, generate

settings, data = get_settings(), load_params().data
registry.connect(settings)
model = mlflow.sklearn.load_model(f"models:/{settings.model_name}@champion")
moved = Drift(covariate={"tenure_months": -1.0, "monthly_charges": 1.0})
start = datetime.now(UTC)
items, n = [], 0
for seed, group in enumerate(sys.argv[1:]):
    variant, version, rows, labelled, drifted = group.split(":")
    df = generate(int(rows), seed=30 + seed, drift=moved if drifted == "1" else None)
    proba = model.predict_proba(model_frame(df, data))[:, 1]
    for i, (rec, p1) in enumerate(zip(df[data.feature_names].to_dict(orient="records"), proba)):
        rid, n = str(uuid.uuid4()), n + 1
        inputs = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in rec.items()}
        items.append(Prediction(rid, start + timedelta(microseconds=n), settings.model_name,
                                version, inputs, str(int(p1 >= 0.5)),
                                {"0": 1 - p1, "1": float(p1)}, 1.0, "default", variant))
        if labelled == "1" and i % 2 == 0:
            items.append(Feedback(rid, str(df.loc[i, data.target]), start + timedelta(days=1),
                                  "default"))
migrate(settings.database_url)
with connect(settings.database_url) as conn:
    create_staging(conn)
    write_items(conn, items)
events = []
monitor_flow.emit_event = lambda **event: events.append(event)
out = monitor_flow.monitor(window_hours=1 / 3600, end=start + timedelta(seconds=1))
print(json.dumps({"outcome": out.payload(), "events": len(events)}))
"""


@pytest.fixture(scope="module")
def variants(
    pipeline: Workspace, postgres: LocalPostgres, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Workspace, str, Path]:
    """The pipeline's workspace on a model of its own (v1 champion, v2 challenger), its own
    prediction log and Evidently workspace."""
    shutil.copytree(
        ROOT / "flows",
        pipeline.path / "flows",
        ignore=shutil.ignore_patterns("__pycache__"),
        dirs_exist_ok=True,
    )
    name = f"variants_{uuid.uuid4().hex[:8]}"
    postgres.start()
    postgres.create_database(name)
    evidently = tmp_path_factory.mktemp("evidently")
    env = pipeline.env | {
        "MODEL_NAME": MODEL,
        "DATABASE_URL": postgres.url(name),
        "EVIDENTLY_WORKSPACE": str(evidently),
        "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-home")),
    }
    ws = Workspace(pipeline.path, env)
    assert ws.python("-c", SETUP, "churn-classifier").stdout.split()[-2:] == ["1", "2"]
    return ws, postgres.url(name), evidently


def run_window(ws: Workspace, *groups: str) -> dict[str, Any]:
    out = ws.python("-c", TRAFFIC, *groups).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def stored(url: str, run_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Each run's row and metrics as PostgreSQL keeps them, by variant."""
    with psycopg.connect(url) as conn:
        runs = conn.execute(
            "SELECT run_id::text, variant, model_version, current_rows, labelled_rows,"
            " drift_detected FROM monitoring_runs WHERE run_id = ANY(%s::uuid[])",
            [run_ids],
        ).fetchall()
        metrics = conn.execute(
            "SELECT run_id::text, variant, metric || ':' || column_name, value"
            " FROM monitoring_metrics WHERE run_id = ANY(%s::uuid[])",
            [run_ids],
        ).fetchall()
    out: dict[str, dict[str, Any]] = {}
    for run_id, variant, version, rows, labelled, drifted in runs:
        mine = {m: v for r, var, m, v in metrics if r == run_id and var == variant}
        out[variant] = {
            "run_id": run_id,
            "version": version,
            "rows": rows,
            "labelled": labelled,
            "drift": drifted,
            "metrics": mine,
        }
    return out


def evidently_charts(workspace: Path, project_id: str, logs: Path) -> dict[str, Any]:
    """Each dashboard panel's series, from an `evidently ui` started on `workspace`."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = Server(
        "evidently ui",
        [
            *(str(VENV_BIN / "evidently"), "ui", "--workspace", str(workspace)),
            *("--host", "127.0.0.1", "--port", str(port)),
        ],
        log_path=logs / "evidently-ui-variants.log",
        healthy=http_ok(f"{url}/api/version"),
        env=clean_env(DO_NOT_TRACK="1"),
    )
    with server.start():
        return series(url, project_id)


def test_each_variant_is_judged_against_its_own_reference_and_kept_with_its_variant(
    variants: tuple[Workspace, str, Path], server_logs: Path
) -> None:
    ws, url, evidently = variants
    # champion v1: calm traffic; challenger v2: traffic like v2's own (moved) reference;
    # shadow v2: calm traffic, unlike v2's reference, never labelled
    out = run_window(ws, "champion:1:3000:1:0", "challenger:2:2000:1:1", "shadow:2:1200:0:0")
    champion = out["outcome"]
    others = {v["variant"]: v for v in champion["variants"]}

    assert (champion["model_version"], champion["current_rows"]) == ("1", 3000)
    assert champion["drift_detected"] is False
    assert set(others) == {"challenger", "shadow"}
    challenger, shadow = others["challenger"], others["shadow"]
    assert (challenger["model_version"], challenger["current_rows"]) == ("2", 2000)
    assert (shadow["model_version"], shadow["current_rows"]) == ("2", 1200)
    # the challenger's moved traffic is what its own reference holds: no drift; the shadow's
    # calm traffic is not, so it drifted, and neither alerts: the champion's verdict decides
    assert challenger["drift_detected"] is False
    assert shadow["drift_detected"] is True
    assert (challenger["alerted"], shadow["alerted"], champion["alerted"]) == (False,) * 3
    assert out["events"] == 0

    rows = stored(url, [champion["run_id"], challenger["run_id"], shadow["run_id"]])
    assert {v: (r["version"], r["rows"], r["labelled"]) for v, r in rows.items()} == {
        "champion": ("1", 3000, 1500),
        "challenger": ("2", 2000, 1000),
        "shadow": ("2", 1200, 0),
    }
    assert rows["challenger"]["metrics"]["drifted:tenure_months"] == 0.0
    assert rows["shadow"]["metrics"]["drifted:tenure_months"] == 1.0
    # live performance per variant, on its own labelled rows; none for the unlabelled shadow
    for variant in ("champion", "challenger"):
        assert 0.5 < rows[variant]["metrics"]["accuracy:"] <= 1.0
        assert 0.5 < rows[variant]["metrics"]["roc_auc:"] <= 1.0
    assert "accuracy:" not in rows["shadow"]["metrics"]
    assert "prediction_drift_score:proba_1" in rows["challenger"]["metrics"]

    # one Evidently project: each variant's snapshots, named and labelled with it
    assert {champion["evidently_project"], challenger["evidently_project"]} == {
        shadow["evidently_project"]
    }
    workspace = EvidentlyWorkspace(str(evidently))
    (project,) = [p for p in workspace.list_projects() if p.name == project_name(MODEL)]
    snapshots = [workspace.get_run(project.id, s) for s in workspace.list_runs(project.id)]
    by_part = {(s.metadata["variant"], s.metadata["part"]): s for s in snapshots}
    assert set(by_part) == {
        ("champion", "drift"),
        ("champion", "performance"),
        ("challenger", "drift"),
        ("challenger", "performance"),
        ("shadow", "drift"),
    }
    assert by_part["champion", "drift"].tags == ["drift"]
    assert by_part["challenger", "drift"].tags == ["challenger", "challenger-drift"]
    assert by_part["shadow", "drift"].tags == ["shadow", "shadow-drift"]
    assert by_part["challenger", "drift"].metadata["model_version"] == "2"
    assert by_part["challenger", "drift"].name.startswith(f"{MODEL} v2 challenger, window to")
    # the project's dashboard, as `evidently ui` serves it: each variant's numbers in its
    # own panels, none of them in the champion's
    charts = evidently_charts(evidently, str(project.id), server_logs)
    assert [s["values"] for s in charts["Rows in window"]] == [[3000.0]]
    assert [s["values"] for s in charts["Rows in window (challenger)"]] == [[2000.0]]
    assert [s["values"] for s in charts["Rows in window (shadow)"]] == [[1200.0]]
    assert len(charts["Model quality on labelled rows (challenger)"]) == 3
    assert charts["Model quality on labelled rows (shadow)"] == []

    # Grafana's SQL panels: a series per variant, side by side
    with psycopg.connect(url) as conn:
        charts = {
            p["title"]: conn.execute(_grafana_sql(p["targets"][0]["rawSql"])).fetchall()
            for p in json.loads((GRAFANA_DASHBOARDS / "monitoring.json").read_text())["panels"]
            if p["datasource"]["uid"] == "monitoring-pg"
        }
    share = {s for _, s, _ in charts["Share of drifted features, per variant (per monitor run)"]}
    assert share >= {"shared champion v1", "shared challenger v2", "shared shadow v2"}
    quality = {series for _, series, _ in charts["Model quality on labelled rows, per variant"]}
    assert {"shared champion v1 accuracy", "shared challenger v2 accuracy"} <= quality


def test_a_window_with_only_champion_rows_is_judged_as_before(
    variants: tuple[Workspace, str, Path],
) -> None:
    ws, url, _ = variants
    out = run_window(ws, "champion:1:1500:1:0")["outcome"]

    assert "variants" not in out
    assert (out["model_version"], out["current_rows"], out["labelled_rows"]) == ("1", 1500, 750)
    with psycopg.connect(url) as conn:
        same_window = conn.execute(
            "SELECT variant, count(*) FROM monitoring_runs WHERE window_end ="
            " (SELECT window_end FROM monitoring_runs WHERE run_id = %s) GROUP BY 1",
            [out["run_id"]],
        ).fetchall()
    assert same_window == [("champion", 1)]
