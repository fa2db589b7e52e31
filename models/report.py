"""report: the Evidently report a monitor run keeps of one window.

Drift and a data summary on every row, classification performance on the rows whose
label has arrived: two Evidently snapshots (tagged DRIFT_TAG and PERFORMANCE_TAG), kept
as HTML and JSON in the run's MLflow artifacts and added to the Evidently workspace
(common.evidently_store), whose dashboards pick their series by these tags. A challenger's
or shadow's window is tagged with its variant instead (`snapshot_tags`), so the champion's
charts never pick up its points. The verdicts themselves are `models.drift`'s.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from evidently import (  # type: ignore[import-untyped]
    BinaryClassification,
    DataDefinition,
    Dataset,
    MulticlassClassification,
    Report,
)
from evidently.core.report import Snapshot  # type: ignore[import-untyped]
from evidently.metrics import RowCount, ValueDrift  # type: ignore[import-untyped]
from evidently.presets import (  # type: ignore[import-untyped]
    ClassificationPreset,
    DataDriftPreset,
    DataSummaryPreset,
)

from common.params import DataParams, MonitorParams
from models.drift import DriftResult, Kind, _Columns, _columns, _frame, _labelled, _threshold

DRIFT_TAG = "drift"
"""Tag of the snapshot computed on every row of a window (drift, data summary)."""
PERFORMANCE_TAG = "performance"
"""Tag of the snapshot computed on the window's labelled rows (classification quality)."""
VARIANT_KEY = "variant"
"""Snapshot metadata naming whose traffic the window is: champion, challenger or shadow."""
DEFAULT_VARIANT = "champion"
PART_KEY = "part"
"""Snapshot metadata naming its part: DRIFT_TAG or PERFORMANCE_TAG."""


def snapshot_tags(part: str, variant: str = DEFAULT_VARIANT) -> list[str]:
    """A snapshot's tags: the part alone for the champion (as before variants existed);
    `<variant>` and `<variant>-<part>` for another variant.

    Evidently matches a panel's series by tags it must all carry, with no way to exclude
    one: a challenger's snapshot tagged `drift` would land in the champion's charts.
    """
    return [part] if variant == DEFAULT_VARIANT else [variant, f"{variant}-{part}"]


SUMMARY_FILE = "summary.json"
HTML_FILE = "report.html"
JSON_FILE = "report.json"


def write(
    result: DriftResult,
    reference: pd.DataFrame,
    current: pd.DataFrame,
    data: DataParams,
    params: MonitorParams,
    *,
    out: Path,
    timestamp: datetime | None = None,
    metadata: Mapping[str, str] | None = None,
) -> MonitorReport | None:
    """What a monitor run keeps of one window, as files in `out`; the report, if one was made.

    `summary.json` (the verdicts' summary and headline rows) always; when the window had
    enough rows to decide, Evidently's report on a `params.report_rows` sample of each
    frame (the verdicts used every row) as `report.html` and `report.json`.
    """
    rows = [(m.metric, m.column, float(m.value)) for m in result.to_rows()]
    (out / SUMMARY_FILE).write_text(
        json.dumps({"summary": result.summary(), "rows": rows}, indent=1)
    )
    if not result.enough_rows:
        return None
    size, seed = params.report_rows, params.seed
    report = evidently_report(
        _sample(reference, size, seed),
        _sample(current, size, seed),
        data,
        params,
        timestamp=timestamp,
        metadata=metadata,
    )
    report.save_html(out / HTML_FILE)
    (out / JSON_FILE).write_text(report.json())
    return report


def _sample(df: pd.DataFrame, rows: int, seed: int) -> pd.DataFrame:
    return df.sample(rows, random_state=seed) if len(df) > rows else df


@dataclass(frozen=True)
class MonitorReport:
    """One window in Evidently: drift and data summary of every row, performance of the labelled.

    An Evidently Report runs on one dataset, so the parts are two snapshots (tagged `drift`
    and `performance`, with one timestamp); `save_html` and `json` keep both in one file
    each. `performance` is None until the labelled rows hold two classes.
    """

    drift: Any
    performance: Any | None
    current_rows: int
    labelled_rows: int

    @property
    def snapshots(self) -> tuple[Any, ...]:
        """What goes to the Evidently workspace, one run each."""
        return (self.drift,) if self.performance is None else (self.drift, self.performance)

    def save_html(self, path: str | Path) -> None:
        """One HTML report: the drift and summary widgets, then the performance ones."""
        if self.performance is None:
            self.drift.save_html(str(path))
            return
        drift, perf = self.drift.to_snapshot_model(), self.performance.to_snapshot_model()
        both = drift.copy(
            update={
                "widgets": [*drift.widgets, *perf.widgets],
                "tests_widgets": [*drift.tests_widgets, *perf.tests_widgets],
            }
        )
        Snapshot.load_model(both).save_html(str(path))

    def dict(self) -> dict[str, Any]:
        """Evidently's dict of the drift snapshot, with the performance snapshot's under a key."""
        perf = None if self.performance is None else json.loads(self.performance.json())
        return {
            **json.loads(self.drift.json()),
            "current_rows": self.current_rows,
            "labelled_rows": self.labelled_rows,
            "performance": perf,
        }

    def json(self) -> str:
        return json.dumps(self.dict())


def evidently_report(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    data: DataParams,
    params: MonitorParams | None = None,
    *,
    timestamp: datetime | None = None,
    metadata: Mapping[str, str] | None = None,
) -> MonitorReport:
    """Evidently's snapshots of one window, to keep as HTML/JSON and in a workspace.

    Drift of features and predictions (and of the label where it arrived) plus a data
    summary on every row of `current`; classification performance (ClassificationPreset)
    on its labelled rows only, against the reference's when the reference is scored.
    `timestamp` (default now) places both snapshots on the dashboards' time axis;
    `metadata` (e.g. model name, version and `variant`, by default the champion) goes on both.
    """
    params = params or MonitorParams()
    when = _naive_local(timestamp or datetime.now())
    labelled = int(current[data.target].notna().sum()) if data.target in current else 0
    meta = {
        "current_rows": str(len(current)),
        "labelled_rows": str(labelled),
        VARIANT_KEY: DEFAULT_VARIANT,
        **(metadata or {}),
    }
    variant = meta[VARIANT_KEY]
    cols = _columns(reference, current, data, params)
    ref, cur = _as_objects(_frame(reference, cols.all)), _as_objects(_frame(current, cols.all))
    testable = {n for n, _ in cols.all if ref[n].notna().any() and cur[n].notna().any()}
    untested = sorted({n for n, _ in cols.all} - testable)
    drift_snapshot = _run(
        [*_drift_metrics(cols, params, testable), DataSummaryPreset()],
        ref,
        cur,
        cols,
        timestamp=when,
        tags=snapshot_tags(DRIFT_TAG, variant),
        metadata={
            **meta,
            PART_KEY: DRIFT_TAG,
            **({"columns_without_values": ", ".join(untested)} if untested else {}),
        },
    )
    performance_snapshot = _performance_report(
        reference,
        current,
        data,
        params,
        timestamp=when,
        tags=snapshot_tags(PERFORMANCE_TAG, variant),
        metadata={**meta, PART_KEY: PERFORMANCE_TAG},
    )
    return MonitorReport(drift_snapshot, performance_snapshot, len(current), labelled)


def _naive_local(when: datetime) -> datetime:
    """Evidently stamps snapshots with naive local time; aware times are converted to it."""
    return when.astimezone().replace(tzinfo=None) if when.tzinfo is not None else when


def _performance_report(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    data: DataParams,
    params: MonitorParams,
    **run: Any,
) -> Any | None:
    """ClassificationPreset on the labelled rows, or None while they hold fewer than two classes.

    Evidently 0.7 fails on one class (ROC AUC by label) and on a float label beside int
    predictions, so labels are normalised as `performance` does and one class is skipped.
    """
    cur = _labelled(current, data, params)
    if cur is None or cur[data.target].nunique() < 2:
        return None
    has_proba = params.probability_column in cur
    ref = _labelled(reference, data, params)
    if ref is not None and not (
        ref[data.target].nunique() >= 2
        and (params.probability_column in ref) == has_proba
        and ref[data.target].dtype.kind == cur[data.target].dtype.kind
    ):
        ref = None
    frames = [cur] if ref is None else [cur, ref]
    labels = (data.target, params.prediction_column)
    classes = sorted({v for f in frames for c in labels for v in f[c].unique().tolist()})
    task: Any
    if len(classes) == 2:
        task = BinaryClassification(
            target=data.target,
            prediction_labels=params.prediction_column,
            prediction_probas=params.probability_column if has_proba else None,
            pos_label=classes[-1],
        )
    else:  # the logged probability is the positive class's; it means nothing for more classes
        task = MulticlassClassification(
            target=data.target, prediction_labels=params.prediction_column, prediction_probas=None
        )
    definition = DataDefinition(
        numerical_columns=[params.probability_column] if has_proba else [],
        categorical_columns=[data.target, params.prediction_column],
        classification=[task],
    )
    return Report([RowCount(), ClassificationPreset()]).run(
        Dataset.from_pandas(cur, data_definition=definition),
        None if ref is None else Dataset.from_pandas(ref, data_definition=definition),
        **run,
    )


def evidently_performance(report: MonitorReport | Any) -> dict[str, Any] | None:
    """The headline numbers as Evidently computed them, named as `performance` names them.

    `report` is a MonitorReport or a performance snapshot; None when it has no performance
    part. Macro F1 is the mean of Evidently's F1ByLabel; `f1` is its F1Score (for a binary
    task, the positive class's).
    """
    snapshot = report.performance if isinstance(report, MonitorReport) else report
    if snapshot is None:
        return None
    values = {
        m["config"]["type"].rsplit(":", 1)[-1]: m["value"] for m in snapshot.dict()["metrics"]
    }
    if "Accuracy" not in values:
        return None
    by_label = values.get("F1ByLabel") or {}
    return {
        "n_labelled": int(values["RowCount"]),
        "accuracy": float(values["Accuracy"]),
        "f1_macro": float(np.mean(list(by_label.values()))) if by_label else math.nan,
        "f1": float(values["F1Score"]),
        "precision": float(values["Precision"]),
        "recall": float(values["Recall"]),
        "roc_auc": float(values["RocAuc"]) if "RocAuc" in values else None,
    }


# --- what Evidently is given ----------------------------------------------------------


def _as_objects(df: pd.DataFrame) -> pd.DataFrame:
    """Categoricals back to plain strings: what a user would hand Evidently."""
    return df.astype(
        {c: object for c in df.columns if isinstance(df[c].dtype, pd.CategoricalDtype)}
    )


def _definition(columns: Sequence[tuple[str, Kind]]) -> Any:
    return DataDefinition(
        numerical_columns=[n for n, k in columns if k == "numeric"],
        categorical_columns=[n for n, k in columns if k == "categorical"],
    )


def _drift_metrics(cols: _Columns, params: MonitorParams, testable: set[str]) -> list[Any]:
    """Evidently's drift tests of the `testable` columns (Evidently raises on a column
    without values on one side; models.drift calls those drifted, `no_values`)."""
    features = [n for n, _ in cols.features if n in testable]
    preset = DataDriftPreset(
        columns=features,
        drift_share=params.drift_share,
        num_threshold=params.num_threshold,
        cat_threshold=params.cat_threshold,
    )
    extra = [
        ValueDrift(column=n, threshold=_threshold(k, params))
        for n, k in cols.extra
        if n in testable
    ]
    return [preset, *extra] if features else extra


def _run(
    metrics: list[Any], ref: pd.DataFrame, cur: pd.DataFrame, cols: _Columns, **run: Any
) -> Any:
    definition = _definition(cols.all)
    return Report(metrics).run(
        Dataset.from_pandas(cur, data_definition=definition),
        Dataset.from_pandas(ref, data_definition=definition),
        **run,
    )
