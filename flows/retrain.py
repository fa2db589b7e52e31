"""retrain: export the labelled production rows, run the `pipeline`, then `promote`.

The deployment of this flow is triggered by the `mlops.drift.detected` event that the
monitor flow emits, with the tenant the event names. The new version is trained on the
raw table plus the labelled predictions that model may learn from (common.production):
the shared model's, of `data.production_tenants`; a tenant's own, of that tenant alone.
It becomes champion only through the gate. `retrain_tenants` queues one run per tenant
on the work pool, where the deployment's concurrency limit keeps them from all starting
at once. One retrain of a model runs at a time and none within params.yaml
`retrain.cooldown_minutes` after one ended (common.retrain_guard): a run that may not is
skipped, ending Completed with a message that says why.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import cast

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import deployment, flow_run
from prefect.states import Completed

from common import production, registry, retrain_guard
from common.params import load_params
from common.registry import tags as tag
from common.settings import get_settings
from flows import fanout
from flows.pipeline import pipeline
from flows.promote import promote

DEPLOYMENT = "retrain/retrain"
ROLLOUT_DEPLOYMENT = "rollout/rollout"
"""The deployment `retrain_tenants` queues runs of (prefect.yaml)."""


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def collect(project_dir: str, tenant: str | None = None) -> int:
    """Write the labelled rows `tenant`'s model may learn from to its production dir, `dvc add`."""
    logger = get_run_logger()
    root = Path(project_dir).resolve()
    data = load_params(root / "params.yaml").for_tenant(tenant).data
    exported = production.export(root, data, get_settings(), logger.info)
    logger.info(exported.note)
    return exported.rows


@task(cache_policy=NO_CACHE)
def link(
    version: str, monitor_run_id: str | None, production_rows: int, tenant: str | None = None
) -> None:
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
    registry.set_tags(client, registry.model_name(settings, tenant), version, tags)


@flow(name="retrain")
def retrain(
    project_dir: str = ".",
    monitor_run_id: str | None = None,
    tenant: str | None = None,
    force: bool = False,
) -> bool:
    """Train a new version of the model serving `tenant` (its own; the shared one if it has
    none, or for None), then promote it under the policy.

    `monitor_run_id` (the MLflow run of the monitoring report that found drift; the
    deployment's trigger passes it and the tenant from the event) is recorded on the new
    version. The register stage already promotes a clear winner when no approval is
    required; then there is no challenger left for `promote` to judge. A winner made a
    canary (params.yaml `rollout.canary`) is left to the rollout flow: live traffic decides
    it, not the holdout again. True if a new champion was made.

    While another retrain of the same model runs, or within params.yaml
    `retrain.cooldown_minutes` after one ended (unless `force`), nothing is trained: the
    run ends Completed, named Skipped, its message saying why (its result: False).
    """
    params = load_params(Path(project_dir) / "params.yaml")
    owner = params.model_owner(tenant)
    if owner != tenant:
        get_run_logger().info(
            "tenant %s has no model of its own: retraining the shared one", tenant
        )
    settings = get_settings()
    model = registry.model_name(settings, owner)
    cooldown = timedelta(minutes=params.retrain.cooldown_minutes)
    holder = str(flow_run.id or "outside a flow run")
    client = registry.connect(settings)
    with retrain_guard.turn(settings, client, model, holder, cooldown=cooldown, force=force) as t:
        if t.skipped:
            get_run_logger().warning(t.skipped)
            # Prefect makes a returned state the run's own; a direct call gets its data.
            return cast(bool, Completed(name="Skipped", message=t.skipped, data=False))
        return _train(project_dir, monitor_run_id, owner)


def _train(project_dir: str, monitor_run_id: str | None, tenant: str | None) -> bool:
    """The retrain itself: export, pipeline, link, then promotion or a canary's rollout."""
    rows = collect(project_dir, tenant)
    result = pipeline(project_dir, tenant)
    link(result.version, monitor_run_id, rows, tenant)
    if result.promoted:
        return True
    if result.canary:
        start_rollout(project_dir, tenant, f"{result.model_name} v{result.version}")
        return False
    return promote(project_dir, tenant)


@task(cache_policy=NO_CACHE)
def start_rollout(project_dir: str, tenant: str | None, what: str) -> str | None:
    """Queue the `rollout` deployment for a new canary when this run is a deployment's (the
    full stack); its flow run id. Outside one (make demo, a local run) say how to start it."""
    if deployment.id is None:
        hint = f"make rollout TENANT={tenant}" if tenant else "make rollout"
        get_run_logger().info("%s is the challenger of a canary: `%s` ramps it", what, hint)
        return None
    run = fanout.queue(ROLLOUT_DEPLOYMENT, tenant, {"project_dir": project_dir})
    get_run_logger().info("%s is the challenger of a canary: rollout run %s queued", what, run.id)
    return str(run.id)


@task(cache_policy=NO_CACHE, task_run_name="queue-{tenant}")
def queue(project_dir: str, tenant: str) -> str:
    """One `retrain` run for `tenant` on the work pool, not waited for; its flow run id."""
    return str(fanout.queue(DEPLOYMENT, tenant, {"project_dir": project_dir}).id)


@flow(name="retrain_tenants")
def retrain_tenants(project_dir: str = ".", tenants: list[str] | None = None) -> list[str]:
    """Queue one `retrain` run per tenant (default: every tenant with a model of its own in
    params.yaml); the pool's workers run them, as many at once as the deployment's
    concurrency limit allows. Their flow run ids."""
    if tenants is None:
        tenants = list(load_params(Path(project_dir) / "params.yaml").tenants)
    return [queue(project_dir, tenant) for tenant in tenants]
