"""Reading tables and putting them in the one shape the model takes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from common.errors import UserError
from common.params import DataParams

MISSING_CATEGORY = "__missing__"
"""What a missing categorical value becomes, so sklearn and ONNX see the same string."""


def read_table(path: Path) -> pd.DataFrame:
    """Read a CSV or Parquet file; anything else, or an unreadable file, is a UserError."""
    if not path.exists():
        raise UserError(f"{path}: file not found (set data.path in params.yaml).")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty; there are no rows to train on.")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix in (".csv", ".txt"):
            return pd.read_csv(path, low_memory=False)
    except (pa.ArrowException, OSError, ValueError, UnicodeDecodeError) as exc:
        kind = "Parquet" if suffix == ".parquet" else "CSV"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: not a readable {kind} file ({first}).") from exc
    raise UserError(f"{path}: unsupported file type '{path.suffix}'; use .csv or .parquet.")


def model_frame(df: pd.DataFrame, data: DataParams) -> pd.DataFrame:
    """Select the features in order: numbers as float64 (NaN for missing), categories as str.

    Missing values are normalised here, at the boundary, because sklearn's imputer treats
    None and NaN differently and ONNX string tensors cannot hold either.
    """
    out = pd.DataFrame(index=df.index)
    for col in data.numeric:
        out[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    for col in data.categorical:
        values = df[col].astype(object)
        missing = values.isna() | (values == "")
        out[col] = values.where(~missing, MISSING_CATEGORY).astype(str)
    return out[data.feature_names]


def target(df: pd.DataFrame, data: DataParams) -> np.ndarray:
    """The label column as a numpy array."""
    return df[data.target].to_numpy()


PROBA_PREFIX = "proba_"
"""Scored tables hold each class's probability in `proba_<class>` (see `proba_column`)."""


def proba_column(label: object) -> str:
    """The column of one class's probability in scored tables and monitoring windows."""
    return f"{PROBA_PREFIX}{label}"
