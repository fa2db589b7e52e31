"""prepare: split the raw table into train and holdout, and keep a reference snapshot.

The split is deterministic (seeded) and stratified on the target when it can be, so
a rerun on the same data gives the same files and DVC sees nothing to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

from common import paths
from common.errors import UserError, run_cli
from common.params import DataParams, PrepareParams, load_params
from models.data import read_table


@dataclass(frozen=True)
class Split:
    train: pd.DataFrame
    holdout: pd.DataFrame
    reference: pd.DataFrame


def split(df: pd.DataFrame, data: DataParams, params: PrepareParams) -> Split:
    """Split rows; keep the raw row number as the index so reports can point at it."""
    if len(df) < 2:
        raise UserError(f"{data.path}: {len(df)} row(s); need at least 2 to split.")
    df = df.copy()
    df.index = pd.RangeIndex(1, len(df) + 1, name="row")
    stratify = None
    if data.target in df:
        counts = df[data.target].value_counts()
        if len(counts) > 1 and counts.min() >= 2:
            stratify = df[data.target]
    train, holdout = train_test_split(
        df, test_size=params.holdout_share, random_state=params.seed, stratify=stratify
    )
    reference = train.sample(min(params.reference_rows, len(train)), random_state=params.seed)
    return Split(train.sort_index(), holdout.sort_index(), reference.sort_index())


def write(parts: Split) -> None:
    paths.PREPARED.mkdir(parents=True, exist_ok=True)
    parts.train.to_parquet(paths.TRAIN)
    parts.holdout.to_parquet(paths.HOLDOUT)
    parts.reference.to_parquet(paths.REFERENCE)


def run(data: DataParams, params: PrepareParams) -> Split:
    parts = split(read_table(Path(data.path)), data, params)
    write(parts)
    return parts


def main() -> None:
    params = load_params()
    parts = run(params.data, params.prepare)
    print(
        f"prepare: {len(parts.train):,} train / {len(parts.holdout):,} holdout rows, "
        f"reference snapshot {len(parts.reference):,} rows -> {paths.PREPARED}/"
    )


if __name__ == "__main__":
    run_cli(main)
