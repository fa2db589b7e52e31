"""drift: data drift, prediction drift, data quality and performance of one window.

The tests are the very ones Evidently 0.7's DataDriftPreset picks for a reference of more
than 1,000 rows (normed Wasserstein for numeric columns, Jensen-Shannon for categorical
ones and for numeric columns with at most 5 values), computed straight with numpy,
without the per-column plots and the second pass Evidently makes for its dataset-level
count. tests/oracle_evidently.py runs Evidently itself on the same windows and the tests
hold both to the same scores and verdicts. With a reference of 1,000 rows or fewer the
same tests stay where Evidently would switch to p-value tests; there the verdicts are
this module's, not Evidently's.

The kept Evidently report of a window is `models.report`'s.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy.spatial import distance
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score

from common.params import DataParams, MonitorParams
from models.data import PROBA_PREFIX

Kind = Literal["numeric", "categorical"]

WASSERSTEIN = "wasserstein"
JENSENSHANNON = "jensenshannon"
NO_VALUES = "no_values"
"""A column with no values on one side: nothing to compare, and drifted if only one side."""


def metric_names(columns: Iterable[str]) -> dict[str, str]:
    """Each column's part of an MLflow metric name, one per column, the same on every run.

    A column keeps its name when MLflow takes it; otherwise each character MLflow refuses
    becomes `_`. When that makes two columns one name (`bill/length` and `bill_length`),
    the rewritten column gets `-` and 8 hex digits of its own name's SHA-1.
    """
    unique = list(dict.fromkeys(columns))
    safe = {c: re.sub(r"[^\w.\- ]", "_", c) for c in unique}
    taken = Counter(safe.values())
    out = {}
    for column in unique:
        name = safe[column]
        if taken[name] > 1 and name != column:
            name = f"{name}-{hashlib.sha1(column.encode()).hexdigest()[:8]}"
        out[column] = name
    return out


@dataclass(frozen=True)
class ColumnDrift:
    """One column's drift test: the score, the method Evidently would pick, the verdict."""

    column: str
    kind: Kind
    method: str
    score: float
    threshold: float
    drifted: bool


@dataclass(frozen=True)
class ColumnQuality:
    """Missing share against the reference's, values outside the contract, unseen categories."""

    column: str
    missing_share: float
    reference_missing_share: float
    out_of_range: int
    new_categories: tuple[str, ...] = ()


@dataclass(frozen=True)
class MetricRow:
    """One headline number; the flow adds the window and model and writes it to Postgres."""

    metric: str
    column: str | None
    value: float


@dataclass(frozen=True)
class DriftResult:
    """Everything one monitoring window decided; `enough_rows=False` decides nothing."""

    reference_rows: int
    current_rows: int
    tested_rows: int
    enough_rows: bool
    drift_share_threshold: float
    features: tuple[ColumnDrift, ...] = ()
    prediction: tuple[ColumnDrift, ...] = ()
    quality: tuple[ColumnQuality, ...] = ()
    labelled_rows: int = 0
    performance: dict[str, Any] | None = None

    @property
    def n_drifted(self) -> int:
        return sum(c.drifted for c in self.features)

    @property
    def share_drifted(self) -> float:
        return self.n_drifted / len(self.features) if self.features else 0.0

    @property
    def dataset_drift(self) -> bool | None:
        """Evidently's dataset verdict: at least `drift_share` of the features drifted."""
        if not self.enough_rows:
            return None
        return self.share_drifted >= self.drift_share_threshold

    @property
    def prediction_drift(self) -> bool | None:
        if not self.enough_rows or not self.prediction:
            return None
        return any(c.drifted for c in self.prediction)

    @property
    def drift_detected(self) -> bool:
        """What should trigger retraining: dataset drift or prediction/label drift."""
        return bool(self.dataset_drift) or bool(self.prediction_drift)

    def to_rows(self) -> list[MetricRow]:
        """Headline numbers in long form (metric, column, value), one table that charts."""
        rows = [
            MetricRow("current_rows", None, self.current_rows),
            MetricRow("reference_rows", None, self.reference_rows),
            MetricRow("labelled_rows", None, self.labelled_rows),
            MetricRow("enough_rows", None, float(self.enough_rows)),
        ]
        if not self.enough_rows:
            return rows
        rows += [
            MetricRow("share_drifted", None, self.share_drifted),
            MetricRow("n_drifted", None, self.n_drifted),
            MetricRow("dataset_drift", None, float(bool(self.dataset_drift))),
        ]
        for c in self.features:
            rows += [
                MetricRow("drift_score", c.column, c.score),
                MetricRow("drifted", c.column, float(c.drifted)),
            ]
        for c in self.prediction:
            rows += [
                MetricRow("prediction_drift_score", c.column, c.score),
                MetricRow("prediction_drifted", c.column, float(c.drifted)),
            ]
        for q in self.quality:
            rows += [
                MetricRow("missing_share", q.column, q.missing_share),
                MetricRow("out_of_range", q.column, q.out_of_range),
                MetricRow("new_categories", q.column, len(q.new_categories)),
            ]
        for name in ("accuracy", "f1_macro", "roc_auc"):
            if self.performance is not None and self.performance.get(name) is not None:
                rows.append(MetricRow(name, None, float(self.performance[name])))
        return rows

    def metrics(self) -> dict[str, float]:
        """`to_rows` as MLflow metrics, named `metric.column` (`drift_score.age`) or `metric`.

        MLflow refuses other characters in a metric name, so a column's ("bill length (mm)")
        become `_`, and a column that then meets another's name gets a suffix of its own
        (`metric_names`): no column's numbers overwrite another's.
        """
        rows = self.to_rows()
        names = metric_names(m.column for m in rows if m.column is not None)
        return {
            f"{m.metric}.{names[m.column]}" if m.column is not None else m.metric: float(m.value)
            for m in rows
        }

    def summary(self) -> str:
        """One paragraph for a log line or a flow run's description."""
        head = f"{self.current_rows:,} rows against a {self.reference_rows:,}-row reference"
        if not self.enough_rows:
            return f"{head}: too few rows to decide anything (no drift verdict)."
        drifted = [c.column for c in self.features if c.drifted]
        text = (
            f"{head} ({self.tested_rows:,} rows tested): "
            f"{self.n_drifted} of {len(self.features)} features drifted "
            f"({self.share_drifted:.0%}; dataset drift at {self.drift_share_threshold:.0%}: "
            f"{'yes' if self.dataset_drift else 'no'})"
        )
        text += f" [{', '.join(drifted)}]." if drifted else "."
        if self.prediction:
            moved = [f"{c.column} {c.score:.3f}" for c in self.prediction if c.drifted]
            text += f" Prediction/label drift: {', '.join(moved) if moved else 'none'}."
        problems = [
            f"{q.column} missing {q.missing_share:.1%} (ref {q.reference_missing_share:.1%})"
            for q in self.quality
            if q.missing_share > q.reference_missing_share + 0.05
        ]
        problems += [
            f"{q.column} {q.out_of_range} out of range" for q in self.quality if q.out_of_range
        ]
        problems += [
            f"{q.column} new {list(q.new_categories)}" for q in self.quality if q.new_categories
        ]
        if problems:
            text += f" Data quality: {'; '.join(problems)}."
        if self.performance is not None:
            p = self.performance
            auc = "n/a" if p["roc_auc"] is None else f"{p['roc_auc']:.3f}"
            text += (
                f" On {p['n_labelled']:,} labelled rows: accuracy {p['accuracy']:.3f}, "
                f"macro F1 {p['f1_macro']:.3f}, ROC AUC {auc}."
            )
        return text


@dataclass(frozen=True)
class _Columns:
    """The columns one window is tested on, by role."""

    features: list[tuple[str, Kind]]
    extra: list[tuple[str, Kind]] = field(default_factory=list)

    @property
    def all(self) -> list[tuple[str, Kind]]:
        return self.features + self.extra


def class_columns(reference: pd.DataFrame, data: DataParams) -> dict[str, str]:
    """A multiclass model's probability columns in its reference: {`proba_<class>`: class}.

    models.train scores the reference with every class's probability for a multiclass
    model and with `probability_column` alone for a binary one: empty for a binary model.
    """
    found = {
        str(c): str(c).removeprefix(PROBA_PREFIX)
        for c in reference.columns
        if str(c).startswith(PROBA_PREFIX) and c not in data.features
    }
    return found if len(found) > 2 else {}


def _columns(
    reference: pd.DataFrame, current: pd.DataFrame, data: DataParams, params: MonitorParams
) -> _Columns:
    features: list[tuple[str, Kind]] = [(c, data.features[c].type) for c in data.feature_names]
    extra: list[tuple[str, Kind]] = []
    probabilities = list(class_columns(reference, data)) or [params.probability_column]
    for name, kind in (
        (params.prediction_column, "categorical"),
        *((p, "numeric") for p in probabilities),
        (data.target, "categorical"),
    ):
        if name in reference and name in current and current[name].notna().sum() > 0:
            extra.append((name, kind))  # type: ignore[arg-type]
    return _Columns(features, extra)


def _frame(df: pd.DataFrame, columns: Sequence[tuple[str, Kind]]) -> pd.DataFrame:
    """Numbers as float64, categories as pandas categoricals of strings, missing ("" too) as NaN.

    Categoricals make counting a million rows cheap; Evidently's report sees the same values.
    """
    out: dict[str, pd.Series] = {}
    for name, kind in columns:
        if kind == "numeric":
            out[name] = pd.to_numeric(df[name], errors="coerce").astype("float64")
            continue
        cat = df[name].astype("category")
        names = [str(c) for c in cat.cat.categories]
        if len(set(names)) < len(names):  # e.g. 1 and "1": merge them through strings
            cat = df[name].where(df[name].isna(), df[name].astype(str)).astype("category")
        else:
            cat = cat.cat.rename_categories(names)
        if "" in cat.cat.categories:
            cat = cat.cat.remove_categories([""])
        out[name] = cat
    return pd.DataFrame(out, index=df.index)


def drift(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    data: DataParams,
    params: MonitorParams,
) -> DriftResult:
    """Compare one window with the reference: features, predictions/labels, quality, performance.

    Prediction drift covers `params.prediction_column` (class balance) and
    `params.probability_column` (positive-class probability) when both frames have them,
    or for a multiclass model every class's probability (`class_columns`); label drift
    covers the target when the current window has labels.
    """
    cols = _columns(reference, current, data, params)
    labelled = int(current[data.target].notna().sum()) if data.target in current else 0
    base = {
        "reference_rows": len(reference),
        "current_rows": len(current),
        "drift_share_threshold": params.drift_share,
        "labelled_rows": labelled,
    }
    if len(current) < params.min_rows:
        return DriftResult(tested_rows=0, enough_rows=False, **base)  # type: ignore[arg-type]
    performance_ = _window_performance(current, data, params, class_columns(reference, data))
    if labelled < params.min_rows:
        cols = _Columns(cols.features, [c for c in cols.extra if c[0] != data.target])
    ref = _frame(reference, cols.all)
    cur = _frame(current, cols.all)
    quality = _quality(ref, cur, data)
    if params.sample_rows is not None and len(cur) > params.sample_rows:
        cur = cur.sample(params.sample_rows, random_state=params.seed)
    results = [_column_drift(ref[n], cur[n], n, k, _threshold(k, params)) for n, k in cols.all]
    by_name = {r.column: r for r in results}
    return DriftResult(
        tested_rows=len(cur),
        enough_rows=True,
        features=tuple(by_name[n] for n, _ in cols.features),
        prediction=tuple(by_name[n] for n, _ in cols.extra),
        quality=quality,
        performance=performance_,
        **base,  # type: ignore[arg-type]
    )


def _threshold(kind: Kind, params: MonitorParams) -> float:
    return params.num_threshold if kind == "numeric" else params.cat_threshold


# --- Evidently's own tests, computed directly -------------------------------------------


def _column_drift(
    reference: pd.Series, current: pd.Series, name: str, kind: Kind, threshold: float
) -> ColumnDrift:
    """Evidently's default test for a >1,000-row reference, with its score and threshold rule.

    A smaller reference gets the same distance tests (Evidently would switch to KS and
    chi-square p-values there), so one threshold scale holds whatever the reference size.
    """
    ref = reference.dropna()
    cur = current.dropna()
    if cur.empty or ref.empty:
        # a column whose values all went missing (or all appeared): no distance to compute,
        # and a change no distribution test would miss (the quality rows show the share)
        one_side = cur.empty != ref.empty
        return ColumnDrift(name, kind, NO_VALUES, float(one_side), threshold, one_side)
    if kind == "numeric":
        u = np.sort(ref.to_numpy(np.float64))
        v = np.sort(cur.to_numpy(np.float64))
        merged = np.sort(np.concatenate([u, v]), kind="stable")  # merges two sorted runs
        values = merged[np.concatenate([[True], merged[1:] != merged[:-1]])]
        if values.size > 5:
            score = _wasserstein_norm(u, v, values)
            return ColumnDrift(name, kind, WASSERSTEIN, score, threshold, score >= threshold)
        ref_keys, ref_counts = np.unique(u, return_counts=True)
        cur_keys, cur_counts = np.unique(v, return_counts=True)
    else:
        ref_keys, ref_counts = _value_counts(ref)
        cur_keys, cur_counts = _value_counts(cur)
    score = _jensenshannon(ref_keys, ref_counts, cur_keys, cur_counts)
    return ColumnDrift(name, kind, JENSENSHANNON, score, threshold, score >= threshold)


def _wasserstein_norm(u: np.ndarray, v: np.ndarray, values: np.ndarray) -> float:
    """scipy's 1-D Wasserstein distance on sorted samples, divided by the reference std.

    scipy.stats.wasserstein_distance integrates |CDF_u - CDF_v| between the pooled sorted
    values; here over the distinct pooled values only (repeated values add gaps of zero),
    which skips its argsorts and most of its searches. Evidently floors the std at 0.001.
    """
    deltas = np.diff(values)
    u_cdf = np.searchsorted(u, values[:-1], "right") / u.size
    v_cdf = np.searchsorted(v, values[:-1], "right") / v.size
    w = float(np.sum(np.multiply(np.abs(u_cdf - v_cdf), deltas)))
    return w / max(float(np.std(u)), 0.001)


def _value_counts(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    counts = values.value_counts(sort=False)
    return counts.index.to_numpy(), counts.to_numpy()


def _jensenshannon(
    ref_keys: np.ndarray, ref_counts: np.ndarray, cur_keys: np.ndarray, cur_counts: np.ndarray
) -> float:
    """Jensen-Shannon distance (natural log) over the union of seen values, as Evidently bins it."""
    ref_map = dict(zip(ref_keys.tolist(), ref_counts.tolist(), strict=True))
    cur_map = dict(zip(cur_keys.tolist(), cur_counts.tolist(), strict=True))
    keys = sorted(set(ref_map) | set(cur_map), key=str)
    p = np.array([ref_map.get(k, 0) for k in keys], dtype=np.float64) / ref_counts.sum()
    q = np.array([cur_map.get(k, 0) for k in keys], dtype=np.float64) / cur_counts.sum()
    return float(distance.jensenshannon(p, q))


# --- data quality and performance -----------------------------------------------------


def _quality(
    reference: pd.DataFrame, current: pd.DataFrame, data: DataParams
) -> tuple[ColumnQuality, ...]:
    """On the prepared frames (see `_frame`), before any sampling: counts are of every row."""
    out = []
    for name, spec in data.features.items():
        cur, ref = current[name], reference[name]
        out_of_range = 0
        new: tuple[str, ...] = ()
        if spec.type == "numeric":
            values = cur.to_numpy(np.float64)
            low = values < spec.min if spec.min is not None else False
            high = values > spec.max if spec.max is not None else False
            out_of_range = int(np.count_nonzero(low | high))
        else:
            known = set(spec.categories or ()) | _present(ref)
            new = tuple(sorted(_present(cur) - known))
        out.append(
            ColumnQuality(
                name,
                float(cur.isna().mean()) if len(cur) else 0.0,
                float(ref.isna().mean()) if len(ref) else 0.0,
                out_of_range,
                new,
            )
        )
    return tuple(out)


def _present(values: pd.Series) -> set[str]:
    counts = values.value_counts(sort=False)
    return {str(k) for k in counts.index[counts.to_numpy() > 0]}


def _window_performance(
    current: pd.DataFrame,
    data: DataParams,
    params: MonitorParams,
    class_probabilities: Mapping[str, str] | None = None,
) -> dict[str, Any] | None:
    """`performance` of the labelled rows; `class_probabilities` as `class_columns` gives them."""
    rows = _labelled(current, data, params)
    if rows is None:
        return None
    y_true, y_pred = rows[data.target].to_numpy(), rows[params.prediction_column].to_numpy()
    if class_probabilities and all(c in current for c in class_probabilities):
        # multiclass: one-vs-rest AUC over every class, when every class has labelled rows
        labels = list(class_probabilities.values())
        y_true, y_pred = y_true.astype(str), y_pred.astype(str)
        matrix = current.loc[current[data.target].notna(), list(class_probabilities)]
        usable = set(y_true.tolist()) == set(labels)
        return performance(y_true, y_pred, matrix.to_numpy(np.float64) if usable else None, labels)
    classes = np.unique(np.concatenate([y_true, y_pred]))
    proba = (
        rows[params.probability_column].to_numpy(np.float64)
        if params.probability_column in rows
        else None
    )
    return performance(y_true, y_pred, proba, classes)


def _labelled(df: pd.DataFrame, data: DataParams, params: MonitorParams) -> pd.DataFrame | None:
    """The rows with a label: label, prediction (same kind of values) and probability, if any.

    None when there is no label or prediction column or no labelled row.
    """
    if data.target not in df or params.prediction_column not in df:
        return None
    rows = df[df[data.target].notna()]
    if rows.empty:
        return None
    y_true, y_pred = _labels(rows[data.target]), _labels(rows[params.prediction_column])
    if y_true.dtype.kind != y_pred.dtype.kind:
        y_true, y_pred = y_true.astype(str), y_pred.astype(str)
    out = pd.DataFrame({data.target: y_true, params.prediction_column: y_pred})
    if params.probability_column in rows:
        out[params.probability_column] = rows[params.probability_column].to_numpy(np.float64)
    return out


def _labels(values: pd.Series) -> np.ndarray:
    """Whole-number labels as int (a label column read with gaps comes back as float)."""
    arr = values.to_numpy()
    if arr.dtype.kind == "f" and np.all(np.mod(arr, 1) == 0):
        return arr.astype(np.int64)
    return arr


def performance(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    proba: np.ndarray | None,
    classes: Sequence[Any] | np.ndarray,
) -> dict[str, Any]:
    """Accuracy, macro F1, ROC AUC and the confusion matrix on the labelled rows.

    `proba` is (n, n_classes) in `classes` order, or the positive class's column for a
    binary task; rows whose label is missing are left out. ROC AUC is None when the
    labelled rows hold one class only (it is undefined there).
    """
    keep = ~pd.isna(np.asarray(y_true))
    y_true = _labels(pd.Series(np.asarray(y_true)[keep]).infer_objects())
    y_pred = np.asarray(y_pred)[keep]
    labels = list(classes)
    auc: float | None = None
    if proba is not None and len(np.unique(y_true)) > 1:
        p = np.asarray(proba, dtype=np.float64)[keep]
        if p.ndim == 2 and len(labels) == 2:
            p = p[:, 1]
        if p.ndim == 1:
            auc = float(roc_auc_score(y_true == labels[-1], p))
        else:
            auc = float(roc_auc_score(y_true, p, multi_class="ovr", labels=labels))
    n = int(keep.sum())
    return {
        "n_labelled": n,
        "accuracy": float(accuracy_score(y_true, y_pred)) if n else math.nan,
        "f1_macro": float(f1_score(y_true, y_pred, average="macro", labels=labels))
        if n
        else math.nan,
        "roc_auc": auc,
        "classes": [str(c) for c in labels],
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist() if n else [],
    }
