"""A monitor run's current data: the window's logged rows, shaped like the reference.

The store reads the rows (it may not import models/); the reference decides the positive
class, the per-class probability columns of a multiclass model, and the dtype the logged
labels and predictions take, so the drift checks compare like with like.
"""

from __future__ import annotations

import pandas as pd

from common.params import Params
from common.store import monitoring
from models import drift


def read_current(
    database_url: str, window: monitoring.Window, params: Params, reference: pd.DataFrame
) -> pd.DataFrame:
    """The window's logged predictions and labels, in the reference's dtype."""
    target = params.data.target
    positive = str(sorted(reference[target].dropna().unique().tolist())[-1])
    current = monitoring.read_window(
        database_url,
        window,
        params.data,
        positive_class=positive,
        prediction_column=params.monitor.prediction_column,
        probability_column=params.monitor.probability_column,
        class_columns=drift.class_columns(reference, params.data),
    )
    for col in (target, params.monitor.prediction_column):
        current[col] = monitoring.target_like(current[col], reference[target])
    return current
