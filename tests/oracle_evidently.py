"""Evidently's own verdicts on a window: the oracle `models.drift` is held to.

`models.drift` computes the tests Evidently's DataDriftPreset picks, straight with numpy.
Here Evidently runs them itself, asked exactly what `models.report` asks it (the same
columns, thresholds and presets), so a test or a benchmark can put both verdicts side by
side. Not production code: the flow never runs Evidently to decide.
"""

from __future__ import annotations

from dataclasses import replace

import pandas as pd

from common.params import DataParams, MonitorParams
from models.drift import (
    JENSENSHANNON,
    WASSERSTEIN,
    ColumnDrift,
    DriftResult,
    _Columns,
    _frame,
    drift,
)
from models.report import _as_objects, _drift_metrics, _run

_EVIDENTLY_METHODS = {
    "Wasserstein distance (normed)": WASSERSTEIN,
    "Jensen-Shannon distance": JENSENSHANNON,
}


def evidently_drift(
    reference: pd.DataFrame, current: pd.DataFrame, data: DataParams, params: MonitorParams
) -> DriftResult:
    """`drift()`'s result on every row, each column's test and verdict Evidently's instead.

    The columns tested, the quality and the performance are `drift()`'s (Evidently has no
    say in them); a window too small to decide is returned as `drift()` decides it.
    """
    result = drift(reference, current, data, params.model_copy(update={"sample_rows": None}))
    if not result.enough_rows:
        return result
    cols = _Columns(
        [(c.column, c.kind) for c in result.features],
        [(c.column, c.kind) for c in result.prediction],
    )
    ref, cur = _frame(reference, cols.all), _frame(current, cols.all)
    by_name = {c.column: c for c in column_drift(ref, cur, cols, params)}
    return replace(
        result,
        features=tuple(by_name[c.column] for c in result.features),
        prediction=tuple(by_name[c.column] for c in result.prediction),
    )


def column_drift(
    ref: pd.DataFrame, cur: pd.DataFrame, cols: _Columns, params: MonitorParams
) -> list[ColumnDrift]:
    """Evidently's ValueDrift of every column, on frames prepared by `models.drift._frame`."""
    every = {n for n, _ in cols.all}
    snapshot = _run(_drift_metrics(cols, params, every), _as_objects(ref), _as_objects(cur), cols)
    kinds = dict(cols.all)
    out = []
    for metric in snapshot.dict()["metrics"]:
        config = metric["config"]
        if not config["type"].endswith(":ValueDrift"):
            continue
        name, score, threshold = (
            config["column"],
            float(metric["value"]),
            float(config["threshold"]),
        )
        method = _EVIDENTLY_METHODS.get(config["method"], config["method"])
        out.append(ColumnDrift(name, kinds[name], method, score, threshold, score >= threshold))
    return out
