"""retrain: export the labelled production rows, run the `pipeline`, then `promote`.

The deployment of this flow is triggered by the `mlops.drift.detected` event that the
monitor flow emits. The new version is trained on the raw table plus every logged
prediction whose true label has arrived, and becomes champion only through the gate.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from common import production, registry
from common.params import load_params
from common.registry import tags as tag
from common.settings import get_settings
from flows.pipeline import pipeline
from flows.promote import promote


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def collect(project_dir: str) -> int:
    """Write the labelled production rows to `data.production_dir` and `dvc add` them."""
    logger = get_run_logger()
    root = Path(project_dir).resolve()
    data = load_params(root / "params.yaml").data
    exported = production.export(root, data, get_settings(), logger.info)
    logger.info(exported.note)
    return exported.rows


@task(cache_policy=NO_CACHE)
def link(version: str, monitor_run_id: str | None, production_rows: int) -> None:
    """Tie the new version to the monitoring report that set off its training."""
    settings = get_settings()
    client = registry.connect(settings)
    tags: dict[str, object] = {tag.DATA_PRODUCTION_ROWS: production_rows}
    if monitor_run_id:
        run = client.get_run(monitor_run_id)
        tags |= {
            tag.RETRAIN_TRIGGER: "mlops.drift.detected",
            tag.RETRAIN_MONITOR_RUN: monitor_run_id,
            tag.RETRAIN_REPORT: f"{run.info.artifact_uri}/monitoring/report.html",
        }
    registry.set_tags(client, settings.model_name, version, tags)


@flow(name="retrain")
def retrain(project_dir: str = ".", monitor_run_id: str | None = None) -> bool:
    """Train a new version on the newest data, then promote it under the policy.

    `monitor_run_id` (the MLflow run of the monitoring report that found drift; the
    deployment's trigger passes it from the event) is recorded on the new version.
    The register stage already promotes a clear winner when no approval is required;
    then there is no challenger left for `promote` to judge. True if a new champion was made.
    """
    rows = collect(project_dir)
    result = pipeline(project_dir)
    link(result.version, monitor_run_id, rows)
    if result.promoted:
        return True
    return promote(project_dir)
