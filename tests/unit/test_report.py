"""The kept Evidently report: drift and summary of every row, performance of the labelled."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.pipeline import Pipeline

from common.params import DataParams, MonitorParams
from models.data import model_frame
from models.drift import drift, performance
from models.generate import Drift, generate
from models.report import evidently_performance, evidently_report, write


def scored(df: pd.DataFrame, model: Pipeline, data: DataParams) -> pd.DataFrame:
    """The window as the prediction log would give it: inputs, prediction, probability, label."""
    proba = model.predict_proba(model_frame(df, data))[:, 1]
    return df.assign(predicted=(proba >= 0.5).astype(int), proba_1=proba)


def test_evidently_report_is_a_snapshot_that_saves_as_html_and_json(
    reference: pd.DataFrame, model: Pipeline, data_params: DataParams, tmp_path: Path
) -> None:
    window = scored(generate(2000, seed=8), model, data_params)
    snapshot = evidently_report(reference.iloc[:3000], window, data_params)
    snapshot.save_html(str(tmp_path / "report.html"))
    assert (tmp_path / "report.html").stat().st_size > 10_000
    metrics = json.loads(snapshot.json())["metrics"]
    drifts = {
        m["config"].get("column") for m in metrics if m["config"]["type"].endswith("ValueDrift")
    }
    assert {"age", "contract_type", "predicted", "proba_1", "churned"} <= drifts


def test_a_column_without_values_in_the_window_is_summarised_not_drift_tested(
    reference: pd.DataFrame, model: Pipeline, data_params: DataParams
) -> None:
    """Evidently raises on an empty column; the report leaves it to the summary and says so
    (models.drift calls it drifted)."""
    window = scored(generate(1000, seed=9), model, data_params)
    window["age"] = np.nan
    snapshot = evidently_report(reference.iloc[:3000], window, data_params)
    metrics = json.loads(snapshot.json())["metrics"]
    drifts = {
        m["config"].get("column") for m in metrics if m["config"]["type"].endswith("ValueDrift")
    }
    assert "age" not in drifts
    assert {"tenure_months", "region", "predicted"} <= drifts
    assert snapshot.drift.to_snapshot_model().metadata["columns_without_values"] == "age"


def test_evidently_report_measures_performance_on_the_labelled_rows_only(
    reference: pd.DataFrame, model: Pipeline, data_params: DataParams, tmp_path: Path
) -> None:
    window = scored(generate(4500, seed=21, drift=Drift(concept=0.5)), model, data_params)
    window["churned"] = window["churned"].astype(float)
    window.loc[window.sample(1500, random_state=0).index, "churned"] = np.nan  # not arrived yet
    labelled = window[window["churned"].notna()]
    report = evidently_report(reference.iloc[:3000], window, data_params)

    ours = performance(
        labelled["churned"].to_numpy(),
        labelled["predicted"].to_numpy(),
        labelled["proba_1"].to_numpy(),
        [0, 1],
    )
    theirs = evidently_performance(report)
    assert theirs is not None
    assert theirs["n_labelled"] == ours["n_labelled"] == report.labelled_rows == 3000
    for name in ("accuracy", "f1_macro", "roc_auc"):
        assert theirs[name] == pytest.approx(ours[name], abs=1e-6), name
    drift_rows = {
        m["config"]["type"].rsplit(":", 1)[-1]: m["value"]
        for m in json.loads(report.json())["metrics"]
    }["RowCount"]
    assert drift_rows == report.current_rows == 4500  # drift and summary saw every row
    report.save_html(tmp_path / "report.html")
    assert "Model Quality Metrics" in (tmp_path / "report.html").read_text()
    assert len(report.snapshots) == 2


@pytest.mark.parametrize("labels", ["none_arrived", "no_label_column", "one_class_only"])
def test_a_window_without_two_labelled_classes_reports_drift_without_performance(
    labels: str,
    reference: pd.DataFrame,
    model: Pipeline,
    data_params: DataParams,
    tmp_path: Path,
) -> None:
    window = scored(generate(1200, seed=22), model, data_params)
    window["churned"] = np.nan if labels == "none_arrived" else window["churned"].astype(float)
    if labels == "no_label_column":
        window = window.drop(columns="churned")
    if labels == "one_class_only":
        window.loc[window.index[20:], "churned"] = np.nan
        window.loc[window.index[:20], "churned"] = 0.0
    report = evidently_report(reference.iloc[:2000], window, data_params)
    assert report.performance is None
    assert evidently_performance(report) is None
    assert report.labelled_rows == (20 if labels == "one_class_only" else 0)
    assert len(report.snapshots) == 1
    saved = json.loads(report.json())
    assert saved["performance"] is None
    assert any(m["config"]["type"].endswith("DriftedColumnsCount") for m in saved["metrics"])
    report.save_html(str(tmp_path / "report.html"))
    assert (tmp_path / "report.html").stat().st_size > 10_000


def test_a_run_keeps_the_summary_always_and_the_report_once_the_window_decides(
    reference: pd.DataFrame,
    model: Pipeline,
    data_params: DataParams,
    monitor_params: MonitorParams,
    tmp_path: Path,
) -> None:
    window = scored(generate(1500, seed=23), model, data_params)
    params = monitor_params.model_copy(update={"report_rows": 1000})
    decided, small = tmp_path / "decided", tmp_path / "small"
    decided.mkdir()
    small.mkdir()

    result = drift(reference, window, data_params, params)
    report = write(result, reference, window, data_params, params, out=decided)
    assert report is not None
    assert report.current_rows == 1000  # a report_rows sample; the verdicts used every row
    assert sorted(p.name for p in decided.iterdir()) == [
        "report.html",
        "report.json",
        "summary.json",
    ]
    kept = json.loads((decided / "summary.json").read_text())
    assert kept["summary"] == result.summary()
    assert len(kept["rows"]) == len(result.to_rows())

    too_few = drift(reference, window.head(params.min_rows - 1), data_params, params)
    assert write(too_few, reference, window, data_params, params, out=small) is None
    assert [p.name for p in small.iterdir()] == ["summary.json"]
