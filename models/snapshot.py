"""snapshot: a tenant's training data, read from its own source into a DVC-tracked file.

The first stage of a tenant's pipeline (`tenant-snapshot@<tenant>` in dvc.yaml). The source
(params.yaml `tenants.<id>.source`: a file, local or `s3://`, or a SQL query) lies outside
the repository, so DVC reruns this stage on every `dvc repro` (`always_changed`) and the
stages after it only when the rows changed; each model version names the snapshot's md5
(`dvc.raw_md5`). The snapshot keeps the data contract's columns (id, features, target), in
that order; a source lacking one stops here, naming the tenant, the source and the columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from common import paths
from common import snapshot as source_reader
from common.errors import UserError, run_cli
from common.params import DataParams, Params, TenantSource, load_params, stage_tenant
from common.settings import Settings, get_settings


@dataclass(frozen=True)
class Snapshot:
    path: Path
    rows: int
    dropped: list[str]


def contract_columns(data: DataParams) -> list[str]:
    """The columns a training table must have: the id (if any), the features, the target."""
    return [*([data.id_column] if data.id_column else []), *data.feature_names, data.target]


def select(df: pd.DataFrame, data: DataParams, tenant: str, source: TenantSource) -> pd.DataFrame:
    """The contract's columns of `df`; a missing one is a UserError naming what is there."""
    wanted = contract_columns(data)
    missing = [c for c in wanted if c not in df.columns]
    if missing:
        raise UserError(
            f"{source_reader.where(tenant, source)}: the data lacks column(s) {missing} of the "
            f"data contract (params.yaml `data`); it has {list(df.columns)}. Nothing after "
            "snapshot ran; the model registry is unchanged."
        )
    return df[wanted].reset_index(drop=True)


def run(tenant: str, params: Params, settings: Settings) -> Snapshot:
    """Read the tenant's source, keep the contract's columns, write the snapshot."""
    source = params.tenants[tenant].source
    where = paths.layout(tenant)
    raw = source_reader.read(tenant, source, settings)
    table = select(raw, params.data, tenant, source)
    where.SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(where.SNAPSHOT, index=False)
    # tenant-prepare@<tenant> depends on the tenant's production folder: it exists from here on,
    # empty until the tenant's first labelled rows are exported there.
    where.PRODUCTION.mkdir(parents=True, exist_ok=True)
    return Snapshot(where.SNAPSHOT, len(table), [c for c in raw.columns if c not in table])


def main() -> None:
    tenant = stage_tenant(required=True)
    assert tenant is not None
    params = load_params()
    params.for_tenant(tenant)  # an unknown tenant: the UserError naming the ones there are
    result = run(tenant, params, get_settings())
    dropped = f"; dropped column(s) {result.dropped}" if result.dropped else ""
    print(f"snapshot: {result.rows:,} rows of tenant {tenant} -> {result.path}{dropped}")


if __name__ == "__main__":
    run_cli(main)
