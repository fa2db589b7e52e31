"""The store layer: everything that reads or writes the prediction database, and batch I/O.

What lives where:
- `connection`: the one connection factory (`connect`, `conninfo`) and pool (`pool`) for
  the prediction database; every caller (the writers, monitoring, batch `table:` sources,
  scripts) uses it.
- `migrations`: the schema (`migrations/NNNN_*.sql`, the project's own) and its runner
  (`migrate`, and `apply_migrations` on an open connection).
- `rows`: the rows (`Prediction`, `Feedback`, `ServingError`), their one JSON encoding
  (`dumps`), spill lines (`to_line`, `from_line`), the batch log rows (`LOG_COLUMNS`,
  `log_rows`) and the write of live rows in one transaction (`create_staging`,
  `write_items`).
- `log`: `PredictionLog`, the service's writer off the request path (with spill files),
  and `prediction_exists`, the feedback endpoint's lookup.
- `batch`: `BatchLogWriter`, a batch job's log rows in one transaction.
- `monitoring`: windows of the log in, monitoring results (`monitoring_runs`,
  `monitoring_metrics`) out.
- `tenants`: tenants, their API keys (`authenticate`), and `scope`, which sets the
  tenant(s) a transaction may see under row-level security.
- `roles`: the service roles (`PREDICTOR`, `FLOWS`, `GRAFANA`, `WORKER`) and URLs logging
  in as them.
- `jobs`: asynchronous jobs: `submit` (the job row and its chunks in the tenant's pgmq
  request queue, one transaction), `read` / `complete` / `retry_later` / `dead_letter`
  (the workers), `claim_callbacks` / `record_callback` (callbacks, at least once), `get` /
  `results` (status and answers), `depths`, `purge`.
- `readback`: a tenant's own predictions and labels, a page at a time.
- `variants`: per-variant live numbers of one model over a window (`live_numbers`): what
  the rollout flow compares.
- `sources`: batch inputs and outputs: Parquet/CSV files, local or `s3://`, and
  PostgreSQL tables (`open_input`, `read_chunks`, `default_batch_id`, `publish`); a whole
  file or a read-only query's rows (`read_file`, `read_query`: a tenant's snapshot).

It may import psycopg, pyarrow (with its S3 filesystem) and the rest of `common`; never
Prefect, BentoML or `models`.
"""

from __future__ import annotations

from common.store import jobs, monitoring, readback, roles, sources, tenants, variants
from common.store.batch import BatchLogWriter
from common.store.connection import CONNECT_TIMEOUT, STATEMENT_TIMEOUT, connect, conninfo, pool
from common.store.log import PredictionLog, prediction_exists
from common.store.migrations import (
    MIGRATIONS_DIR,
    apply_migrations,
    migrate,
    migration_names,
    pending,
)
from common.store.rows import (
    BATCH_LOG_COLUMNS,
    LIVE_LOG_COLUMNS,
    LOG_COLUMNS,
    VARIANTS,
    Feedback,
    Item,
    Prediction,
    ServingError,
    create_staging,
    dumps,
    from_line,
    log_rows,
    to_line,
    write_items,
)

__all__ = [
    "BATCH_LOG_COLUMNS",
    "CONNECT_TIMEOUT",
    "LIVE_LOG_COLUMNS",
    "LOG_COLUMNS",
    "MIGRATIONS_DIR",
    "STATEMENT_TIMEOUT",
    "VARIANTS",
    "BatchLogWriter",
    "Feedback",
    "Item",
    "Prediction",
    "PredictionLog",
    "ServingError",
    "apply_migrations",
    "connect",
    "conninfo",
    "create_staging",
    "dumps",
    "from_line",
    "jobs",
    "log_rows",
    "migrate",
    "migration_names",
    "monitoring",
    "pending",
    "pool",
    "prediction_exists",
    "readback",
    "roles",
    "sources",
    "tenants",
    "to_line",
    "variants",
    "write_items",
]
