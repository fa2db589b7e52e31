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
def stage(stage: str, root: Path) -> None:
    """One dvc.yaml stage through `dvc repro --single-item`, streamed to the log."""
    run_id = flow_run.get_id()
    dvc_pipeline.run_stage(stage, root, get_run_logger().info, str(run_id) if run_id else None)


@flow(name="pipeline")
def pipeline(project_dir: str = ".", tenant: str | None = None) -> dvc_pipeline.RunSummary:
    """Pull data, run the shared model's dvc.yaml stages (or `tenant`'s own) in order, push,
    and summarise the new version."""
    root = Path(project_dir).resolve()
    names = dvc_pipeline.stages(root, tenant)
    remote = dvc_pipeline.has_remote(root)
    if remote:
        dvc(PULL, root)
    for name in names:
        stage(name, root)
    if remote:
        dvc("push", root)
    result = dvc_pipeline.summary(root, tenant)
    create_markdown_artifact(
        dvc_pipeline.summary_markdown(result, get_settings().tracking_uri),
        key="pipeline-summary",
        description=f"{result.model_name} v{result.version}",
    )
    get_run_logger().info(
        "%s v%s %s: %s",
        result.model_name,
        result.version,
        "promoted" if result.promoted else "kept as challenger",
        result.reason,
    )
    return result
