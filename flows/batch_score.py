"""batch_score: score a Parquet/CSV file (local or s3://) or a table with the champion, in chunks.

With `tenant`, the batch is that tenant's: scored with its own champion
(`<MODEL_NAME>.<tenant>`) if it has one, else the shared one, and logged as its rows.

`source` is a path (`data/incoming/daily.parquet`, `s3://bucket/key.csv`) or
`table:[schema.]name`, a table or view in the database of DATABASE_URL: the connection
stays in the environment, never in a run's parameters. A table is read with one COPY in
a single snapshot, ordered by the id column (`data.id_column`) then the features, so the
same rows get the same row numbers and request ids on every run.

Predictions go to `<output_dir>/<batch_id>/predictions.parquet` and the prediction log
(when DATABASE_URL is set), bad rows to `rejects.parquet` with a reason. `output_dir` may
be `s3://bucket/prefix` (the S3 settings of the source apply): the files are written
locally under MLOPS_HOME first and copied up once the batch succeeded. A re-run with the
same batch id rewrites the same files and adds no log rows.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun
from prefect.tasks import Task

from common import batch_job
from common.errors import UserError
from common.params import load_params
from common.registry.served import ServedModel, cache_dir, for_tenant
from common.settings import Settings, get_settings
from common.store import sources
from common.store.tenants import DEFAULT_TENANT, check_tenant_id
from models import batch


def _retry_unless_user_error(_task: Task[..., object], _run: TaskRun, state: State) -> bool:
    """Retry network trouble, never bad input or configuration."""
    try:
        state.result()
    except UserError:
        return False
    except Exception:  # anything else may be transient
        return True
    return True


def _s3(settings: Settings) -> sources.S3Options:
    return sources.S3Options(
        endpoint_url=settings.mlflow_s3_endpoint_url,
        access_key=settings.aws_access_key_id,
        secret_key=settings.aws_secret_access_key,
    )


@task(
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=_retry_unless_user_error,
    cache_policy=NO_CACHE,
)
def fetch_champion(settings: Settings, tenant: str | None = None) -> ServedModel:
    """Download the version the serving alias points at (cached by version): the tenant's
    own model's, else the shared model's."""
    return for_tenant(settings, tenant, cache_dir(settings))


@task(
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=_retry_unless_user_error,
    cache_policy=NO_CACHE,
)
def open_source(source: str, settings: Settings) -> sources.Input:
    """Find the file or table and read its columns; refuse a missing one before any work."""
    return sources.open_input(source, _s3(settings), settings.database_url)


@task(cache_policy=NO_CACHE)
def score(
    inp: sources.Input,
    model: ServedModel,
    batch_id: str,
    output_dir: Path,
    settings: Settings,
    *,
    tenant: str = DEFAULT_TENANT,
) -> batch.BatchResult:
    """Score every chunk; files and log rows (as `tenant`'s) appear only if the whole
    batch succeeds."""
    logger = get_run_logger()
    params = load_params()
    logger.info(
        "scoring %s as batch %s of tenant %s with %s v%s (%s), %d rows a chunk",
        inp.source,
        batch_id,
        tenant,
        model.name,
        model.version,
        model.scorer.backend,
        params.batch_score.chunk_rows,
    )
    if not settings.database_url:
        logger.warning("DATABASE_URL is not set: predictions are not logged")
    return batch_job.run(
        inp,
        model,
        batch_id,
        output_dir,
        chunk_rows=params.batch_score.chunk_rows,
        id_column=params.data.id_column,
        database_url=settings.database_url,
        tenant=tenant,
        progress=lambda rows, rejected: logger.info(
            "%s rows read, %s rejected", f"{rows:,}", f"{rejected:,}"
        ),
    )


@task(
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=_retry_unless_user_error,
    cache_policy=NO_CACHE,
)
def publish(result: batch.BatchResult, output_dir: str, settings: Settings) -> batch.BatchResult:
    """Copy the finished batch's files to `output_dir` (s3://)."""
    where = sources.publish(result.files, output_dir, result.batch_id, _s3(settings))
    published = dataclasses.replace(result, published=where)
    get_run_logger().info("batch %s copied to %s/", result.batch_id, published.published)
    return published


@flow(name="batch_score")
def batch_score(
    source: str,
    batch_id: str | None = None,
    output_dir: str = "data/scored",
    tenant: str | None = None,
) -> batch.BatchResult:
    """Score `source` with the champion; predictions and rejects to `output_dir/<batch_id>/`.

    `source`: a Parquet or CSV path, local or `s3://`, or `table:[schema.]name` in the
    database of DATABASE_URL. Without `batch_id`, one derived from the source and a stamp
    of its content (a file's size and time, a table's row count and row hash), prefixed
    with the tenant when one is given. `tenant`: score with its champion and log its rows
    (unset: the shared champion, rows of the default tenant).
    """
    if tenant is not None:
        check_tenant_id(tenant)
    settings = get_settings()
    inp = open_source(source, settings)
    model = fetch_champion(settings, tenant)
    bid = batch_id or sources.default_batch_id(inp)
    if batch_id is None and tenant is not None:
        bid = f"{tenant}-{bid}"  # request ids derive from it: tenants' batches never collide
    remote = output_dir.startswith("s3://")
    local = settings.mlops_home.resolve() / "batch-out" if remote else Path(output_dir).resolve()
    result = score(inp, model, bid, local, settings, tenant=tenant or DEFAULT_TENANT)
    if remote:
        result = publish(result, output_dir, settings)
    get_run_logger().info(
        "batch %s: %s scored, %s rejected in %.1f s (%s rows/s)",
        result.batch_id,
        f"{result.scored:,}",
        f"{result.rejected:,}",
        result.seconds,
        f"{result.rows_per_second:,.0f}",
    )
    create_table_artifact(
        [
            {"what": "batch id", "value": result.batch_id},
            {"what": "tenant", "value": tenant or DEFAULT_TENANT},
            {"what": "source", "value": result.source},
            {"what": "model", "value": f"{result.model_name} v{result.model_version}"},
            {"what": "backend", "value": result.backend},
            {"what": "rows scored", "value": f"{result.scored:,}"},
            {"what": "rows rejected", "value": f"{result.rejected:,}"},
            {
                "what": "new prediction-log rows",
                "value": "not logged" if result.logged is None else f"{result.logged:,}",
            },
            {"what": "predictions", "value": _where(result, result.predictions_path)},
            {"what": "rejects", "value": _where(result, result.rejects_path)},
            {"what": "rows/s", "value": f"{result.rows_per_second:,.0f}"},
        ],
        key="batch-score-summary",
        description=f"batch {result.batch_id}: {result.scored:,} scored, "
        f"{result.rejected:,} rejected",
    )
    return result


def _where(result: batch.BatchResult, path: Path) -> str:
    return f"{result.published}/{path.name}" if result.published else str(path)


if __name__ == "__main__":
    import sys

    batch_score(*sys.argv[1:2])
