"""A batch-score job: one input through one model version, its predictions logged, in one call.

`models.batch.score_batch` is the ML (check each chunk, score it, shape the rows, write the
two Parquet files); this module gives it the input's chunks (a file or table, through
`common.store.sources`) and, when there is a prediction database, the log writer
(`common.store.BatchLogWriter`), which commits every row of the batch or none, as the
tenant the batch is scored for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

from common.registry.served import ServedModel
from common.store import BatchLogWriter, sources
from common.store.tenants import DEFAULT_TENANT
from models import batch


def run(
    inp: sources.Input,
    model: ServedModel,
    batch_id: str,
    output_dir: Path,
    *,
    chunk_rows: int,
    id_column: str | None,
    database_url: str | None,
    tenant: str = DEFAULT_TENANT,
    progress: Callable[[int, int], None] | None = None,
) -> batch.BatchResult:
    """Score `inp` with `model`, `chunk_rows` rows at a time, into `output_dir/batch_id/`.

    The id column, when the input has it, is kept beside the predictions and orders a
    table's rows. Without `database_url` the predictions are written but not logged; with
    it, logged as `tenant`'s rows.
    """
    keep = [id_column] if id_column else []
    read = batch.columns_to_read(inp.source, inp.columns, model.scorer.features, keep)
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(BatchLogWriter(database_url, tenant)) if database_url else None
        return batch.score_batch(
            sources.read_chunks(inp, read, chunk_rows),
            model.scorer,
            source=inp.source,
            columns=inp.columns,
            model_name=model.name,
            model_version=model.version,
            batch_id=batch_id,
            output_dir=output_dir,
            keep=keep,
            sink=sink,
            progress=progress,
        )
