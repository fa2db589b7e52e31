"""monitor: drift, data quality and late-label performance of the served model's traffic.

Reads one window of the prediction log (by time and model version) with the labels that
have arrived, compares it with the reference logged with the served version, keeps the
Evidently report (HTML and JSON in an MLflow run of the monitoring experiment, and a
snapshot in the Evidently workspace), writes the headline numbers to PostgreSQL and,
over threshold, alerts: a warning, a Prefect artifact, a POST to MONITOR_WEBHOOK_URL and
the Prefect event `mlops.drift.detected` that triggers the `retrain` deployment.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import mlflow
import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.runtime import flow_run

from common import evidently_store, monitoring, registry
from common.errors import UserError
from common.localpg import prediction_db
from common.params import Params, load_params
from common.settings import Settings, get_settings
from models import monitor as drift_core
from models.train import HOLDOUT_SCORED_FILE, REFERENCE_FILE

DRIFT_EVENT = "mlops.drift.detected"
"""The event the `retrain` deployment's trigger expects (prefect.yaml)."""


@dataclass(frozen=True)
class Served:
    name: str
    version: str
    model_dir: Path


@dataclass(frozen=True)
class Outcome:
    """What one monitor run decided and where its results are."""

    run_id: str
    model_name: str
    model_version: str
    window_start: str
    window_end: str
    current_rows: int
    labelled_rows: int
    enough_rows: bool
    drift_detected: bool
    share_drifted: float
    summary: str
    mlflow_run_id: str | None
    report_uri: str | None
    evidently_project: str | None
    alerted: bool


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def served_version(settings: Settings, version: str | None) -> Served:
    """The version to monitor (default: the one the serving alias points at), downloaded."""
    client = registry.connect(settings)
    if version is None:
        mv = registry.version_by_alias(client, settings.model_name, settings.model_alias)
        if mv is None:
            raise UserError(
                f"model {settings.model_name!r} has no alias {settings.model_alias!r}: "
                "nothing is served yet, so there is nothing to monitor (run `make demo`)."
            )
        version = str(mv.version)
    cache = settings.mlops_home.resolve() / "monitor-models"
    return Served(
        settings.model_name, version, registry.download_version(cache, settings.model_name, version)
    )


@task(cache_policy=NO_CACHE)
def reference_of(served: Served) -> pd.DataFrame:
    """The scored holdout logged with the version (features, label, predictions)."""
    extra = served.model_dir / "extra_files"
    for name in (HOLDOUT_SCORED_FILE, REFERENCE_FILE):  # older versions logged only the latter
        if (extra / name).is_file():
            return pd.read_parquet(extra / name)
    raise UserError(
        f"{served.name} v{served.version} carries no reference data "
        f"(extra_files/{HOLDOUT_SCORED_FILE}); retrain it with this project's train stage."
    )


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def read_window(
    database_url: str, window: monitoring.Window, params: Params, reference: pd.DataFrame
) -> pd.DataFrame:
    """The window's logged predictions, labels and predictions in the reference's dtype."""
    target = params.data.target
    positive = str(sorted(reference[target].dropna().unique().tolist())[-1])
    current = monitoring.read_window(
        database_url,
        window,
        params.data,
        positive_class=positive,
        prediction_column=params.monitor.prediction_column,
        probability_column=params.monitor.probability_column,
        class_columns=drift_core.class_columns(reference, params.data),
    )
    for col in (target, params.monitor.prediction_column):
        current[col] = monitoring.target_like(current[col], reference[target])
    return current


@task(cache_policy=NO_CACHE)
def check(reference: pd.DataFrame, current: pd.DataFrame, params: Params) -> drift_core.DriftResult:
    """The verdicts, on every row of the window."""
    return drift_core.drift(reference, current, params.data, params.monitor)


def _sample(df: pd.DataFrame, rows: int, seed: int) -> pd.DataFrame:
    return df.sample(rows, random_state=seed) if len(df) > rows else df


@task(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=[5])
def keep(  # noqa: PLR0917  (a task's inputs are its signature)
    settings: Settings,
    params: Params,
    served: Served,
    window: monitoring.Window,
    reference: pd.DataFrame,
    current: pd.DataFrame,
    result: drift_core.DriftResult,
    run_id: str,
) -> tuple[str, str | None, str | None]:
    """The report in MLflow and the Evidently workspace: (mlflow run id, report uri, project)."""
    client = registry.connect(settings)
    exp_id = registry.experiment_id(client, settings, params.monitor.experiment)
    project: str | None = None
    with (
        mlflow.start_run(experiment_id=exp_id, run_name=f"monitor v{served.version}") as run,
        tempfile.TemporaryDirectory() as tmp,
    ):
        mlflow.set_tags(
            {
                "model.name": served.name,
                "model.version": served.version,
                "window.start": window.start.isoformat(),
                "window.end": window.end.isoformat(),
                "monitor.run_id": run_id,
                "drift.detected": str(result.drift_detected).lower(),
                "enough_rows": str(result.enough_rows).lower(),
                **({"prefect.flow_run_id": str(flow_run.id)} if flow_run.id else {}),
            }
        )
        mlflow.log_metrics(
            {
                _metric_key(f"{m.metric}.{m.column}" if m.column else m.metric): float(m.value)
                for m in result.to_rows()
            }
        )
        out = Path(tmp)
        (out / "summary.json").write_text(
            json.dumps({"summary": result.summary(), "rows": _rows(result)}, indent=1)
        )
        if result.enough_rows:
            seed, rows = params.monitor.seed, params.monitor.report_rows
            report = drift_core.evidently_report(
                _sample(reference, rows, seed),
                _sample(current, rows, seed),
                params.data,
                params.monitor,
                timestamp=window.end,
                metadata={"model_name": served.name, "model_version": served.version},
            )
            report.save_html(str(out / "report.html"))
            (out / "report.json").write_text(report.json())
            project = evidently_store.add_snapshot(
                settings.evidently_target,
                f"{served.name} monitoring",
                report,
                description=f"{served.name} v{served.version}, window to {window.end:%F %H:%M} UTC",
            )
            mlflow.set_tag("evidently.project", project)
        mlflow.log_artifacts(str(out), artifact_path="monitoring")
        report_uri = f"{run.info.artifact_uri}/monitoring"
    registry.set_tags(
        client,
        served.name,
        served.version,
        {
            "monitor.last_run": run.info.run_id,
            "monitor.last_window_end": window.end.isoformat(timespec="seconds"),
            "monitor.last_drift": str(result.drift_detected).lower(),
        },
    )
    return run.info.run_id, report_uri, project


def _metric_key(name: str) -> str:
    """An MLflow metric name: a column's other characters ("bill length (mm)") as `_`."""
    return re.sub(r"[^\w.\- ]", "_", name)


def _rows(result: drift_core.DriftResult) -> list[tuple[str, str | None, float]]:
    return [(m.metric, m.column, float(m.value)) for m in result.to_rows()]


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def record(database_url: str, run: monitoring.RunRecord, result: drift_core.DriftResult) -> None:
    """The headline numbers as rows in PostgreSQL (`monitoring_runs`, `monitoring_metrics`)."""
    monitoring.write_results(database_url, run, _rows(result))


@task(cache_policy=NO_CACHE)
def alert(settings: Settings, outcome: Outcome, result: drift_core.DriftResult) -> None:
    """Warn, leave an artifact, POST the webhook (if set) and emit the retrain event."""
    logger = get_run_logger()
    logger.warning("DRIFT %s v%s: %s", outcome.model_name, outcome.model_version, outcome.summary)
    drifted = [c for c in (*result.features, *result.prediction) if c.drifted]
    table = "\n".join(
        f"| {c.column} | {c.method} | {c.score:.3f} | {c.threshold} |" for c in drifted
    )
    create_markdown_artifact(
        f"## Drift detected: {outcome.model_name} v{outcome.model_version}\n\n"
        f"{outcome.summary}\n\n"
        f"| column | test | score | threshold |\n|---|---|---|---|\n{table}\n\n"
        f"Report: `{outcome.report_uri}` (MLflow run `{outcome.mlflow_run_id}`). "
        f"Event `{DRIFT_EVENT}` emitted: the `retrain` deployment runs on it.",
        key="drift-alert",
        description=f"drift in {outcome.model_name} v{outcome.model_version}",
    )
    payload = {"event": DRIFT_EVENT, **asdict(outcome)}
    if settings.monitor_webhook_url:
        try:
            httpx.post(settings.monitor_webhook_url, json=payload, timeout=10).raise_for_status()
        except httpx.HTTPError as exc:  # the alert is also in the log, the artifact and the event
            logger.error("webhook %s failed: %s", settings.monitor_webhook_url, exc)
    emit_event(
        event=DRIFT_EVENT,
        resource={
            "prefect.resource.id": f"mlops.model.{outcome.model_name}",
            "prefect.resource.name": outcome.model_name,
            "mlops.model.version": outcome.model_version,
        },
        payload=payload,
    )


@flow(name="monitor")
def monitor(
    window_hours: float | None = None,
    end: datetime | None = None,
    model_version: str | None = None,
) -> Outcome:
    """Check one window of live traffic against the served version's reference."""
    settings = get_settings()
    params = load_params()
    logger = get_run_logger()
    end = (end or datetime.now(UTC)).astimezone(UTC)
    start = end - timedelta(hours=window_hours or params.monitor.window_hours)
    served = served_version(settings, model_version)
    window = monitoring.Window(served.name, served.version, start, end)
    reference = reference_of(served)
    run_id = monitoring.new_run_id()
    with prediction_db(settings, reuse_running=True) as database_url:
        current = read_window(database_url, window, params, reference)
        result = check(reference, current, params)
        logger.info("%s v%s: %s", served.name, served.version, result.summary())
        mlflow_run, report_uri, project = keep(
            settings, params, served, window, reference, current, result, run_id
        )
        outcome = Outcome(
            run_id=run_id,
            model_name=served.name,
            model_version=served.version,
            window_start=start.isoformat(timespec="seconds"),
            window_end=end.isoformat(timespec="seconds"),
            current_rows=result.current_rows,
            labelled_rows=result.labelled_rows,
            enough_rows=result.enough_rows,
            drift_detected=result.drift_detected,
            share_drifted=result.share_drifted,
            summary=result.summary(),
            mlflow_run_id=mlflow_run,
            report_uri=report_uri,
            evidently_project=project,
            alerted=result.drift_detected,
        )
        record(
            database_url,
            monitoring.RunRecord(
                run_id=run_id,
                model_name=served.name,
                model_version=served.version,
                window_start=start,
                window_end=end,
                current_rows=result.current_rows,
                labelled_rows=result.labelled_rows,
                enough_rows=result.enough_rows,
                drift_detected=result.drift_detected,
                summary=outcome.summary,
                mlflow_run_id=mlflow_run,
                report_uri=report_uri,
                evidently_project=project,
            ),
            result,
        )
    if result.drift_detected:
        alert(settings, outcome, result)
    create_markdown_artifact(
        _markdown(outcome), key="monitor-summary", description=f"{served.name} v{served.version}"
    )
    return outcome


def _markdown(o: Outcome) -> str:
    verdict = (
        "too few rows: no verdict"
        if not o.enough_rows
        else ("**drift detected**" if o.drift_detected else "no drift")
    )
    return (
        f"## Monitoring {o.model_name} v{o.model_version}\n\n"
        f"| | |\n|---|---|\n| window | {o.window_start} to {o.window_end} |\n"
        f"| rows | {o.current_rows:,} ({o.labelled_rows:,} labelled) |\n"
        f"| verdict | {verdict} |\n| drifted features | {o.share_drifted:.0%} |\n"
        f"| MLflow run | `{o.mlflow_run_id}` |\n| report | `{o.report_uri}` |\n"
        f"| Evidently project | `{o.evidently_project}` |\n\n{o.summary}\n"
    )


def _cli() -> dict[str, Any]:
    return asdict(monitor())


if __name__ == "__main__":
    print(json.dumps(_cli(), indent=2, default=str))
