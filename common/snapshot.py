"""A tenant's training data read from its source (params.yaml `tenants.<id>.source`) in one call.

The `snapshot` stage (models/snapshot.py) writes what this returns to a DVC-tracked file,
so every model version names the exact rows it saw. The reading is the batch job's
(common.store.sources): a Parquet or CSV file, local or `s3://`, or a SQL query run in a
read-only transaction through the URL in the environment variable `url_env` (never in
params.yaml). Every failure is one UserError naming the tenant, the source and the problem.
"""

from __future__ import annotations

import pandas as pd

from common.errors import UserError
from common.params import TenantSource
from common.settings import Settings
from common.store import sources


def where(tenant: str, source: TenantSource) -> str:
    """How a message names the source: the tenant and its path or query (never a URL)."""
    return f"tenant {tenant!r}, source {source.describe()}"


def read(tenant: str, source: TenantSource, settings: Settings) -> pd.DataFrame:
    """Every row the source holds now, as a DataFrame."""
    try:
        if source.path is not None:
            s3 = sources.S3Options(
                endpoint_url=settings.mlflow_s3_endpoint_url,
                access_key=settings.aws_access_key_id,
                secret_key=settings.aws_secret_access_key,
            )
            inp = sources.open_input(source.path, s3)
            if not isinstance(inp, sources.FileInput):
                raise UserError("a table is read with `sql:` and `url_env`, not `path:`")
            table = sources.read_file(inp)
        else:
            assert source.sql is not None  # TenantSource: a query comes with its url_env
            assert source.url_env is not None
            url = settings.variable(source.url_env)
            if not url:
                raise UserError(
                    f"the environment variable {source.url_env} (`url_env`) is not set; "
                    "set it to a read-only connection string of the database"
                )
            table = sources.read_query(source.sql, url, source.url_env)
    except UserError as exc:  # the readers' messages start with the path: said once here
        problem = str(exc).removeprefix(f"{source.path}: ")
        raise UserError(f"{where(tenant, source)}: {problem}") from exc
    frame: pd.DataFrame = table.to_pandas()
    return frame
