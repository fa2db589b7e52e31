"""pipeline: the whole DVC pipeline as Prefect tasks, one per dvc.yaml stage, with a summary.

Named after `make pipeline` (`dvc repro`), not after `train`, which is one of its stages.
With `tenant`, it runs that tenant's own chain (`tenant-snapshot@<id>` ... `tenant-register@<id>`)
instead, and the summary names the tenant's model (`<MODEL_NAME>.<id>`).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import State, TaskRun
from prefect.runtime import flow_run
from prefect.tasks import Task

from common import dvc_pipeline
from common.settings import get_settings

PULL = "pull --allow-missing"
"""What the remote lacks (on a first run there is no dvc.lock yet), the stages make."""


def _retry_unless_rejected(_task: Task[..., None], _run: TaskRun, state: State) -> bool:
    """Retry crashes and network errors, never a stage that refused its input."""
    try:
        state.result()
    except dvc_pipeline.StageRejectedError:
        return False
    except Exception:  # any other failure may be transient
        return True
    return True


@task(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_retry_unless_rejected)
def dvc(command: str, root: Path) -> None:
    """`dvc pull` / `dvc push` (command and options), its output in the flow's log."""
    dvc_pipeline.run((*dvc_pipeline.DVC, *command.split()), root, get_run_logger().info)


@task(
    task_run_name="{stage}",
    retries=2,
    retry_delay_seconds=[5, 30],
    retry_condition_fn=_retry_unless_rejected,
)
def stage(stage: str, root: Path) -> bool:
    """One dvc.yaml stage through `dvc repro --single-item`, streamed to the log; True if
    it ran (False: its inputs had not changed)."""
    run_id = flow_run.get_id()
    return dvc_pipeline.run_stage(
        stage, root, get_run_logger().info, str(run_id) if run_id else None
    )


@task
def check_registered(result: dvc_pipeline.RunSummary) -> None:
    """An earlier run's version must be in the registry this run talks to, or the run fails."""
    dvc_pipeline.check_in_registry(result, get_settings())


@flow(name="pipeline")
def pipeline(project_dir: str = ".", tenant: str | None = None) -> dvc_pipeline.RunSummary:
    """Pull data, run the shared model's dvc.yaml stages (or `tenant`'s own) in order, push,
    and summarise what this run did: the version it registered, or, when nothing changed,
    the earlier run's version, checked to be in this run's registry."""
    root = Path(project_dir).resolve()
    names = dvc_pipeline.stages(root, tenant)
    remote = dvc_pipeline.has_remote(root)
    if remote:
        dvc(PULL, root)
    ran = {name: stage(name, root) for name in names}
    if remote:
        dvc("push", root)
    registered_now = ran.get(dvc_pipeline.register_stage(tenant), True)
    result = dvc_pipeline.summary(root, tenant, registered_now)
    if not registered_now:
        check_registered(result)
    create_markdown_artifact(
        dvc_pipeline.summary_markdown(result, get_settings().tracking_uri),
        key="pipeline-summary",
        description=f"{result.model_name} v{result.version}",
    )
    get_run_logger().info(
        "%s v%s %s", result.model_name, result.version, dvc_pipeline.verdict(result)
    )
    return result
