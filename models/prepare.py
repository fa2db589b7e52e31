"""prepare: split the raw table (plus labelled production rows) into train and holdout.

Each row's side of the split is decided by a hash of its id (or of the whole row when
there is no id column), not by shuffling: adding rows later never moves an old row
across, so a retrained challenger and the champion are compared on a holdout neither
was trained on. Rerun on the same data, it writes the same files and DVC sees nothing
to do. A reference snapshot of the training rows is kept for drift monitoring.

`--tenant <id>` (the `tenant-prepare@<id>` stage) splits that tenant's snapshot and its own
production rows into its own files (`paths.layout(tenant)`): no other tenant's row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common import paths
from common.errors import UserError, run_cli
from common.params import DataParams, PrepareParams, load_params, stage_tenant
from models.data import read_table

_BUCKETS = 1_000_000


@dataclass(frozen=True)
class Split:
    train: pd.DataFrame
    holdout: pd.DataFrame
    reference: pd.DataFrame
    production_rows: int = 0


def in_holdout(df: pd.DataFrame, data: DataParams, share: float, seed: int) -> np.ndarray:
    """True for the rows of the holdout: a seeded hash of the id (or row), stable per row."""
    key = df[data.id_column] if data.id_column and data.id_column in df else df
    hashed = pd.util.hash_pandas_object(key, index=False, hash_key=f"{seed:016d}"[:16])
    return np.asarray(hashed.to_numpy() % _BUCKETS < round(share * _BUCKETS))


def split(df: pd.DataFrame, data: DataParams, params: PrepareParams) -> Split:
    """Split rows; keep the row number (1-based, raw then production) so reports can point at it."""
    if len(df) < 2:
        raise UserError(f"{data.path}: {len(df)} row(s); need at least 2 to split.")
    df = df.copy()
    df.index = pd.RangeIndex(1, len(df) + 1, name="row")
    hold = in_holdout(df, data, params.holdout_share, params.seed)
    if hold.all() or not hold.any():
        raise UserError(
            f"{data.path}: {len(df)} row(s) leave one side of the split empty "
            f"(prepare.holdout_share={params.holdout_share}); add rows."
        )
    train, holdout = df[~hold], df[hold]
    reference = train.sample(min(params.reference_rows, len(train)), random_state=params.seed)
    return Split(train, holdout, reference.sort_index())


def production_rows(data: DataParams) -> pd.DataFrame | None:
    """Labelled production rows exported by the monitor/retrain flows, oldest file first."""
    if not data.production_dir:
        return None
    folder = Path(data.production_dir)
    files = sorted([*folder.glob("*.parquet"), *folder.glob("*.csv")]) if folder.is_dir() else []
    if not files:
        return None
    frames = [read_table(f) for f in files]
    return pd.concat(frames, ignore_index=True)


def combine(raw: pd.DataFrame, production: pd.DataFrame | None, data: DataParams) -> pd.DataFrame:
    """The raw table with production rows appended, on the raw table's columns."""
    if production is None or production.empty:
        return raw
    missing = [c for c in raw.columns if c not in production and c != data.id_column]
    if missing:
        raise UserError(
            f"{data.production_dir}: production rows lack column(s) {missing} of {data.path}."
        )
    if data.id_column and data.id_column in production:  # the latest export of a row wins
        production = production.drop_duplicates(data.id_column, keep="last")
    production = production.reindex(columns=raw.columns)
    for col in raw.columns:  # e.g. labels exported as text, a feature with no value yet
        if production[col].dtype != raw[col].dtype and pd.api.types.is_numeric_dtype(raw[col]):
            production[col] = pd.to_numeric(production[col], errors="coerce")
    return pd.concat([raw, production], ignore_index=True)


def write(parts: Split, where: paths.Layout = paths.SHARED) -> None:
    where.PREPARED.mkdir(parents=True, exist_ok=True)
    parts.train.to_parquet(where.TRAIN)
    parts.holdout.to_parquet(where.HOLDOUT)
    parts.reference.to_parquet(where.REFERENCE)


def run(data: DataParams, params: PrepareParams, where: paths.Layout = paths.SHARED) -> Split:
    production = production_rows(data)
    parts = split(combine(read_table(Path(data.path)), production, data), data, params)
    n_production = 0 if production is None else len(production)
    parts = Split(parts.train, parts.holdout, parts.reference, n_production)
    write(parts, where)
    return parts


def main() -> None:
    tenant = stage_tenant()
    params = load_params().for_tenant(tenant)
    where = paths.layout(tenant)
    parts = run(params.data, params.prepare, where)
    extra = f" (incl. {parts.production_rows:,} production rows)" if parts.production_rows else ""
    print(
        f"prepare: {len(parts.train):,} train / {len(parts.holdout):,} holdout rows{extra}, "
        f"reference snapshot {len(parts.reference):,} rows -> {where.PREPARED}/"
    )


if __name__ == "__main__":
    run_cli(main)
