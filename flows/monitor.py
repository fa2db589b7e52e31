"""monitor: drift, data quality and late-label performance of the served model's traffic.

Reads one window of the prediction log (by time and model version) with the labels that
have arrived, compares it with the reference logged with the served version, keeps the
Evidently report (HTML and JSON in an MLflow run of the monitoring experiment, and a
snapshot in the Evidently workspace), writes the headline numbers to PostgreSQL and,
over threshold, alerts: a warning, a Prefect artifact, a POST to MONITOR_WEBHOOK_URL and
the Prefect event `mlops.drift.detected` that triggers the `retrain` deployment.

A run is the shared model's (`tenant` None) or one tenant's: that tenant's rows only,
against the model serving it (common.window), its numbers, report and event under its
name, so drift in one customer's traffic retrains that customer's model alone.
`monitor_tenants` queues one run per tenant on the work pool.

Per variant: when a challenger or a shadow was live in the window, its rows are judged
apart, against its own version's reference, with the same checks, report (a snapshot pair
in the same Evidently project, named and labelled with the variant), MLflow run and rows
(`variant` column); the champion's verdict alone decides the alert and the retrain.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.runtime import flow_run

from common import alerts, evidently_store, registry
from common import window as window_data
from common.localpg import prediction_db
from common.params import Params, load_params
from common.registry import tags as tag
from common.registry.served import ServedModel
from common.settings import Settings, get_settings
from common.store import monitoring, roles
from common.store.monitoring import CHAMPION
from flows import fanout
from models import drift as drift_core
from models import report

DRIFT_EVENT = "mlops.drift.detected"
"""The event the `retrain` deployment's trigger expects (prefect.yaml)."""
TENANT_TAG = "mlops.tenant"
"""The MLflow run tag and event resource label naming a run's tenant (absent: the shared model)."""
VARIANT_TAG = "monitor.variant"
"""The MLflow run tag naming whose traffic a monitor run judged: champion, challenger, shadow."""


def _variant(window: monitoring.Window) -> str:
    return window.variant or CHAMPION


@dataclass(frozen=True)
class Outcome:
    """What one monitor run decided and where its results are.

    `run` is the row `monitoring_runs` keeps; the flow adds the drifted share and the alert.
    `run` is the champion's, whose verdict decides; `variants` are the other variants live
    in the window (a challenger, a shadow), each judged against its own version's reference
    and never alerting.
    """

    run: monitoring.RunRecord
    share_drifted: float
    alerted: bool
    variants: tuple[Outcome, ...] = ()

    def payload(self) -> dict[str, Any]:
        """One flat JSON-ready dict: the webhook's body, the drift event's payload, `_cli`'s print.

        The keys are the champion run's fields, `share_drifted` and `alerted`, and, when a
        challenger or shadow was live, `variants`: each one's payload with its `variant`.
        prefect.yaml's retrain trigger reads `mlflow_run_id` and `tenant_id` (None: the
        shared model) from it.
        """
        run = asdict(self.run)
        run.pop("variant")  # the top level is the champion's; the others are under `variants`
        for key in ("window_start", "window_end"):
            run[key] = run[key].isoformat(timespec="seconds")
        out = {**run, "share_drifted": self.share_drifted, "alerted": self.alerted}
        if self.variants:
            out["variants"] = [{"variant": v.run.variant, **v.payload()} for v in self.variants]
        return out


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def served_version(settings: Settings, tenant: str | None, version: str | None) -> ServedModel:
    """The version serving `tenant` (default: under the serving alias), downloaded."""
    return window_data.served(settings, tenant, version)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def live_variants(
    database_url: str, window: monitoring.Window, tenant: str | None
) -> list[monitoring.LiveVariant]:
    """The challengers and shadows (variant, version, rows) live in the window's traffic."""
    return window_data.live_variants(database_url, window, tenant)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def variant_version(settings: Settings, model_name: str, version: str) -> ServedModel:
    """A challenger's or shadow's version, downloaded with its reference."""
    return window_data.version_of(settings, model_name, version)


@task(cache_policy=NO_CACHE)
def reference_of(served: ServedModel) -> pd.DataFrame:
    """The scored holdout logged with the version (features, label, predictions)."""
    return served.reference()


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def read_window(
    database_url: str,
    window: monitoring.Window,
    params: Params,
    reference: pd.DataFrame,
    tenant: str | None,
) -> pd.DataFrame:
    """The window's logged predictions and labels (`tenant`'s only, if set), as the reference;
    a window of more than params.yaml `monitor.max_rows` rows, as a sample of that many."""
    current = window_data.read_current(database_url, window, params, reference, tenant)
    if len(current) >= params.monitor.max_rows:
        get_run_logger().warning(
            "the window has at least monitor.max_rows (%d) rows: judging a sample of that many",
            params.monitor.max_rows,
        )
    return current


@task(cache_policy=NO_CACHE)
def check(reference: pd.DataFrame, current: pd.DataFrame, params: Params) -> drift_core.DriftResult:
    """The verdicts, on every row of the window."""
    return drift_core.drift(reference, current, params.data, params.monitor)


@task(cache_policy=NO_CACHE)
def write_report(  # noqa: PLR0917  (a task's inputs are its signature)
    params: Params,
    served: ServedModel,
    window: monitoring.Window,
    reference: pd.DataFrame,
    current: pd.DataFrame,
    result: drift_core.DriftResult,
    out: Path,
) -> report.MonitorReport | None:
    """The files the run keeps (summary, Evidently report as HTML and JSON) in `out`."""
    return report.write(
        result,
        reference,
        current,
        params.data,
        params.monitor,
        out=out,
        timestamp=window.end,
        metadata={
            "model_name": served.name,
            "model_version": served.version,
            report.VARIANT_KEY: _variant(window),
        },
    )


@task(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=[5])
def upload_report(
    settings: Settings,
    served: ServedModel,
    window: monitoring.Window,
    kept: report.MonitorReport,
    project: str,
) -> str:
    """The window's snapshots in the Evidently project `project`; the project's id."""
    return evidently_store.add_snapshot(
        settings.evidently_target,
        project,
        kept,
        description=f"{served.name} v{served.version} {_variant(window)},"
        f" window to {window.end:%F %H:%M} UTC",
    )


@task(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=[5])
def log_run(  # noqa: PLR0917  (a task's inputs are its signature)
    settings: Settings,
    params: Params,
    served: ServedModel,
    window: monitoring.Window,
    result: drift_core.DriftResult,
    run_id: str,
    project: str | None,
    files: Path,
    tenant: str | None,
) -> tuple[str, str]:
    """The run in the monitoring experiment, the kept files as its artifacts: (run id, uri)."""
    variant = _variant(window)
    tags = {
        "model.name": served.name,
        "model.version": served.version,
        VARIANT_TAG: variant,
        "window.start": window.start.isoformat(),
        "window.end": window.end.isoformat(),
        "monitor.run_id": run_id,
        "drift.detected": str(result.drift_detected).lower(),
        "enough_rows": str(result.enough_rows).lower(),
        **({"prefect.flow_run_id": str(flow_run.id)} if flow_run.id else {}),
        **({"evidently.project": project} if project else {}),
        **({TENANT_TAG: tenant} if tenant else {}),
    }
    return registry.log_run(
        settings,
        params.monitor.experiment,
        f"monitor v{served.version}"
        + ("" if variant == CHAMPION else f" {variant}")
        + (f" {tenant}" if tenant else ""),
        tags=tags,
        metrics=result.metrics(),
        artifacts=files,
        artifact_path="monitoring",
    )


@task(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=[5])
def tag_version(
    settings: Settings,
    served: ServedModel,
    window: monitoring.Window,
    result: drift_core.DriftResult,
    mlflow_run: str,
) -> None:
    """The version remembers its last monitor run, window and verdict (`monitor.last_*`)."""
    registry.set_tags(
        registry.connect(settings),
        served.name,
        served.version,
        {
            tag.MONITOR_LAST_RUN: mlflow_run,
            tag.MONITOR_LAST_WINDOW_END: window.end.isoformat(timespec="seconds"),
            tag.MONITOR_LAST_DRIFT: str(result.drift_detected).lower(),
        },
    )


def _rows(result: drift_core.DriftResult) -> list[tuple[str, str | None, float]]:
    return [(m.metric, m.column, float(m.value)) for m in result.to_rows()]


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def record(database_url: str, run: monitoring.RunRecord, result: drift_core.DriftResult) -> None:
    """The headline numbers as rows in PostgreSQL (`monitoring_runs`, `monitoring_metrics`)."""
    monitoring.write_results(database_url, run, _rows(result))


@task(cache_policy=NO_CACHE)
def alert(settings: Settings, payload: dict[str, Any]) -> None:
    """POST the alert to MONITOR_WEBHOOK_URL, if set; a failure is logged, not raised."""
    failure = alerts.post_webhook(settings.monitor_webhook_url, payload)
    if failure:  # the alert is also in the log, the `drift-alert` artifact and the event
        get_run_logger().error(failure)


def drift_resource(run: monitoring.RunRecord) -> dict[str, str]:
    """The drift event's resource: the tenant whose traffic drifted, else the shared model."""
    tenant = run.tenant_id
    return {
        "prefect.resource.id": f"mlops.tenant.{tenant}"
        if tenant
        else f"mlops.model.{run.model_name}",
        "prefect.resource.name": f"{run.model_name} ({_whose(tenant)})",
        "mlops.model.name": run.model_name,
        "mlops.model.version": run.model_version,
        **({TENANT_TAG: tenant} if tenant else {}),
    }


def _raise_alarm(settings: Settings, outcome: Outcome, result: drift_core.DriftResult) -> None:
    """Over threshold: warn, leave the `drift-alert` artifact, page, emit the retrain event."""
    run = outcome.run
    whose = f" (tenant {run.tenant_id})" if run.tenant_id else ""
    get_run_logger().warning(
        "DRIFT %s v%s%s: %s", run.model_name, run.model_version, whose, run.summary
    )
    create_markdown_artifact(
        _alert_markdown(outcome, result),
        key="drift-alert",
        description=f"drift in {run.model_name} v{run.model_version}{whose}",
    )
    payload = {"event": DRIFT_EVENT, **outcome.payload()}
    alert(settings, payload)
    emit_event(event=DRIFT_EVENT, resource=drift_resource(run), payload=payload)


@flow(name="monitor")
def monitor(
    window_hours: float | None = None,
    end: datetime | None = None,
    model_version: str | None = None,
    tenant: str | None = None,
) -> Outcome:
    """Check one window of live traffic against the served version's reference.

    `tenant` None: the shared model's traffic, every tenant's; a tenant id: that tenant's
    rows only, against its own model's champion if it has one, else the shared one's.
    A challenger's or shadow's rows in the window are judged too, each against its own
    version's reference (`Outcome.variants`); only the champion's drift alerts.
    """
    settings = get_settings()
    params = load_params()
    end = (end or datetime.now(UTC)).astimezone(UTC)
    start = end - timedelta(hours=window_hours or params.monitor.window_hours)
    served = served_version(settings, tenant, model_version)
    window = monitoring.Window(served.name, served.version, start, end, CHAMPION)
    with prediction_db(settings, reuse_running=True, role=roles.FLOWS) as database_url:
        champion, result = judge(settings, params, database_url, served, window, tenant)
        others = []
        for live in live_variants(database_url, window, tenant):
            version = variant_version(settings, served.name, live.model_version)
            of_variant = monitoring.Window(served.name, version.version, start, end, live.variant)
            other, _ = judge(settings, params, database_url, version, of_variant, tenant)
            others.append(other)
    outcome = Outcome(champion.run, champion.share_drifted, champion.alerted, tuple(others))
    if outcome.alerted:
        _raise_alarm(settings, outcome, result)
    create_markdown_artifact(
        _markdown(outcome),
        key="monitor-summary",
        description=f"{served.name} v{served.version} {_whose(tenant)}",
    )
    return outcome


def judge(  # noqa: PLR0917  (the run's context, passed on to its tasks)
    settings: Settings,
    params: Params,
    database_url: str,
    served: ServedModel,
    window: monitoring.Window,
    tenant: str | None,
) -> tuple[Outcome, drift_core.DriftResult]:
    """One variant's rows of the window against its version's reference, kept and recorded.

    The verdict, report, MLflow run, version tags and rows of `window.variant`'s traffic;
    the outcome alerts only for the champion (the caller raises the alarm).
    """
    logger = get_run_logger()
    variant = _variant(window)
    reference = reference_of(served)
    run_id = monitoring.new_run_id()
    current = read_window(database_url, window, params, reference, tenant)
    result = check(reference, current, params)
    said = f"{served.name} v{served.version}" + ("" if variant == CHAMPION else f" ({variant})")
    if variant != CHAMPION and result.drift_detected:
        logger.warning(
            "%s %s: %s No alert: the champion's verdict decides.",
            said,
            _whose(tenant),
            result.summary(),
        )
    else:
        logger.info("%s %s: %s", said, _whose(tenant), result.summary())
    with tempfile.TemporaryDirectory() as tmp:
        files = Path(tmp)
        kept = write_report(params, served, window, reference, current, result, files)
        name = evidently_store.project_name(window.model_name, tenant)
        project = None if kept is None else upload_report(settings, served, window, kept, name)
        mlflow_run, report_uri = log_run(
            settings, params, served, window, result, run_id, project, files, tenant
        )
    tag_version(settings, served, window, result, mlflow_run)
    run = monitoring.RunRecord(
        run_id=run_id,
        model_name=served.name,
        model_version=served.version,
        window_start=window.start,
        window_end=window.end,
        current_rows=result.current_rows,
        labelled_rows=result.labelled_rows,
        enough_rows=result.enough_rows,
        drift_detected=result.drift_detected,
        summary=result.summary(),
        mlflow_run_id=mlflow_run,
        report_uri=report_uri,
        evidently_project=project,
        tenant_id=tenant,
        variant=variant,
    )
    record(database_url, run, result)
    alerted = result.drift_detected and variant == CHAMPION
    return Outcome(run, share_drifted=result.share_drifted, alerted=alerted), result


@task(cache_policy=NO_CACHE, task_run_name="queue-{tenant}")
def queue(tenant: str | None, window_hours: float | None, end: datetime | None) -> str:
    """One `monitor` run for `tenant` on the work pool, not waited for; its flow run id."""
    return str(fanout.queue(DEPLOYMENT, tenant, {"window_hours": window_hours, "end": end}).id)


DEPLOYMENT = "monitor/monitor"
"""The deployment `monitor_tenants` queues runs of (prefect.yaml)."""


@flow(name="monitor_tenants")
def monitor_tenants(window_hours: float | None = None, end: datetime | None = None) -> list[str]:
    """Queue one `monitor` run for the shared model and one per tenant with a model of its
    own (params.yaml `tenants`); the pool's workers run them. Their flow run ids."""
    tenants = [None, *load_params().tenants]
    return [queue(tenant, window_hours, end) for tenant in tenants]


def _whose(tenant: str | None) -> str:
    return f"tenant {tenant}" if tenant else "shared model"


def _alert_markdown(o: Outcome, result: drift_core.DriftResult) -> str:
    r = o.run
    drifted = [c for c in (*result.features, *result.prediction) if c.drifted]
    table = "\n".join(
        f"| {c.column} | {c.method} | {c.score:.3f} | {c.threshold} |" for c in drifted
    )
    return (
        f"## Drift detected: {r.model_name} v{r.model_version}, {_whose(r.tenant_id)}\n\n"
        f"{r.summary}\n\n"
        f"| column | test | score | threshold |\n|---|---|---|---|\n{table}\n\n"
        f"Report: `{r.report_uri}` (MLflow run `{r.mlflow_run_id}`). "
        f"Event `{DRIFT_EVENT}` emitted: the `retrain` deployment runs on it."
    )


def _markdown(o: Outcome) -> str:
    r = o.run
    verdict = _verdict(r)
    start, end = (t.isoformat(timespec="seconds") for t in (r.window_start, r.window_end))
    return (
        f"## Monitoring {r.model_name} v{r.model_version}, {_whose(r.tenant_id)}\n\n"
        f"| | |\n|---|---|\n| window | {start} to {end} |\n"
        f"| rows | {r.current_rows:,} ({r.labelled_rows:,} labelled) |\n"
        f"| verdict | {verdict} |\n| drifted features | {o.share_drifted:.0%} |\n"
        f"| MLflow run | `{r.mlflow_run_id}` |\n| report | `{r.report_uri}` |\n"
        f"| Evidently project | `{r.evidently_project}` |\n\n{r.summary}\n"
        + (_variants_markdown(o) if o.variants else "")
    )


def _variants_markdown(o: Outcome) -> str:
    """The variants side by side (rows, verdict, drifted share), then each one's summary."""
    runs = [(v.run, v.share_drifted) for v in (o, *o.variants)]
    table = "\n".join(
        f"| {r.variant} | v{r.model_version} | {r.current_rows:,} ({r.labelled_rows:,}) "
        f"| {_verdict(r)} | {share:.0%} |"
        for r, share in runs
    )
    notes = "\n".join(f"- **{r.variant}** v{r.model_version}: {r.summary}" for r, _ in runs)
    return (
        "\n### Variants (each against its own version's reference)\n\n"
        "| variant | version | rows (labelled) | verdict | drifted features |\n"
        f"|---|---|---|---|---|\n{table}\n\n{notes}\n"
    )


def _verdict(r: monitoring.RunRecord) -> str:
    if not r.enough_rows:
        return "too few rows: no verdict"
    return "**drift detected**" if r.drift_detected else "no drift"


def _cli() -> dict[str, Any]:
    return monitor().payload()


if __name__ == "__main__":
    print(json.dumps(_cli(), indent=2, default=str))
