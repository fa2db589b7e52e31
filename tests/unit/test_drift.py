"""Drift verdicts: injected drift is caught, clean windows are not, Evidently agrees."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from evidently import (  # type: ignore[import-untyped]
    BinaryClassification,
    DataDefinition,
    Dataset,
    Report,
)
from evidently.presets import ClassificationPreset  # type: ignore[import-untyped]
from mlflow.utils.validation import _validate_metric_name
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from sklearn.pipeline import Pipeline

from common.params import DataParams, MonitorParams
from models.data import model_frame
from models.drift import ColumnDrift, ColumnQuality, DriftResult, drift, performance
from models.generate import NUMERIC, Drift, generate
from tests.oracle_evidently import evidently_drift

SCORE_TOLERANCE = 1e-9


def scored(df: pd.DataFrame, model: Pipeline, data: DataParams) -> pd.DataFrame:
    """The window as the prediction log would give it: inputs, prediction, probability, label."""
    proba = model.predict_proba(model_frame(df, data))[:, 1]
    return df.assign(predicted=(proba >= 0.5).astype(int), proba_1=proba)


def drifted_columns(result: DriftResult) -> set[str]:
    return {c.column for c in (*result.features, *result.prediction) if c.drifted}


def test_windows_from_the_reference_distribution_are_not_flagged(
    reference: pd.DataFrame, model: Pipeline, data_params: DataParams, monitor_params: MonitorParams
) -> None:
    """Measured false-alarm rate: 0 of 10 windows, 0 of 170 column tests (largest score 0.045).

    5,000-row windows, 10 seeds, labels included (14 features, prediction, probability, label).
    At the smallest window that may decide (1,000 rows), 50 seeds flagged 1 column of 850
    (num_products at 0.110) and no dataset drift.
    """
    for seed in range(100, 110):
        window = scored(generate(5000, seed=seed), model, data_params)
        result = drift(reference, window, data_params, monitor_params)
        assert result.enough_rows
        assert drifted_columns(result) == set(), result.summary()
        assert result.dataset_drift is False
        assert result.prediction_drift is False
        assert max(c.score for c in (*result.features, *result.prediction)) < 0.08


def test_covariate_drift_is_flagged_on_the_shifted_features(
    reference: pd.DataFrame, data_params: DataParams, monitor_params: MonitorParams
) -> None:
    shift = {"age": 0.5, "avg_daily_usage_min": -0.4, "payment_method": 0.5, "region": 0.3}
    window = generate(5000, seed=11, drift=Drift(covariate=shift))
    result = drift(reference, window, data_params, monitor_params)
    assert set(shift) <= drifted_columns(result)
    assert not {"plan_tier", "late_payments_12m", "num_products"} & drifted_columns(result)
    assert result.dataset_drift is False  # 4 of 14 features is under the 50% share


def test_broad_covariate_drift_is_dataset_drift(
    reference: pd.DataFrame, data_params: DataParams, monitor_params: MonitorParams
) -> None:
    shift = {col: 0.5 for col in NUMERIC[:8]}
    window = generate(5000, seed=12, drift=Drift(covariate=shift))
    result = drift(reference, window, data_params, monitor_params)
    assert result.share_drifted >= monitor_params.drift_share
    assert result.dataset_drift is True
    assert result.drift_detected
    assert "dataset drift at 50%: yes" in result.summary()


def test_class_balance_shift_is_prediction_and_label_drift(
    reference: pd.DataFrame, model: Pipeline, data_params: DataParams, monitor_params: MonitorParams
) -> None:
    window = scored(generate(5000, seed=13, drift=Drift(churn_rate=0.5)), model, data_params)
    labelled = drift(reference, window, data_params, monitor_params)
    # The probability carries the shift; the 0.5-threshold label barely moves (the small
    # model predicts ~2% churners on the reference, ~6% here: JS 0.07 < 0.1).
    assert {"proba_1", "churned"} <= drifted_columns(labelled)
    assert labelled.prediction_drift is True
    assert labelled.drift_detected
    unlabelled = drift(reference, window.drop(columns="churned"), data_params, monitor_params)
    assert [c.column for c in unlabelled.prediction] == ["predicted", "proba_1"]
    assert unlabelled.prediction_drift is True
    assert unlabelled.labelled_rows == 0
    assert unlabelled.performance is None


def test_concept_drift_shows_as_a_performance_drop_with_labels(
    reference: pd.DataFrame, model: Pipeline, data_params: DataParams, monitor_params: MonitorParams
) -> None:
    before = scored(generate(5000, seed=14), model, data_params)
    after = scored(generate(5000, seed=14, drift=Drift(concept=1.0)), model, data_params)
    ok = drift(reference, before, data_params, monitor_params).performance
    bad = drift(reference, after, data_params, monitor_params).performance
    assert ok is not None
    assert bad is not None
    assert ok["n_labelled"] == bad["n_labelled"] == 5000
    assert ok["roc_auc"] - bad["roc_auc"] > 0.15
    assert ok["f1_macro"] > bad["f1_macro"]


CASES = {
    "clean": Drift(),
    "covariate": Drift(covariate={"age": 0.4, "num_products": 1.0, "payment_method": -0.2}),
    "class_balance": Drift(churn_rate=0.45),
    "concept_and_covariate": Drift(
        covariate={"tenure_months": 0.2, "contract_type": 0.4}, concept=0.8
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_drift_reproduces_evidently_scores_and_verdicts(
    case: str,
    reference: pd.DataFrame,
    model: Pipeline,
    data_params: DataParams,
    monitor_params: MonitorParams,
) -> None:
    window = scored(generate(4000, seed=20, drift=CASES[case]), model, data_params)
    ref = reference.iloc[:6000]
    fast = drift(ref, window, data_params, monitor_params)
    slow = evidently_drift(ref, window, data_params, monitor_params)
    pairs = list(
        zip((*fast.features, *fast.prediction), (*slow.features, *slow.prediction), strict=True)
    )
    assert len(pairs) == len(data_params.features) + 3
    for f, e in pairs:
        assert (f.column, f.method, f.threshold, f.drifted) == (
            e.column,
            e.method,
            e.threshold,
            e.drifted,
        )
        assert abs(f.score - e.score) <= SCORE_TOLERANCE, f.column
    assert fast.dataset_drift == slow.dataset_drift
    assert {c.method for c in fast.features} == {"wasserstein", "jensenshannon"}


def test_a_window_with_too_few_rows_decides_nothing(
    reference: pd.DataFrame, data_params: DataParams, monitor_params: MonitorParams
) -> None:
    window = generate(monitor_params.min_rows - 1, seed=3, drift=Drift(covariate={"age": 3.0}))
    result = drift(reference, window, data_params, monitor_params)
    assert not result.enough_rows
    assert result.features == ()
    assert result.dataset_drift is None
    assert result.prediction_drift is None
    assert not result.drift_detected
    assert "too few rows" in result.summary()
    assert {r.metric for r in result.to_rows()} == {
        "current_rows",
        "reference_rows",
        "labelled_rows",
        "enough_rows",
    }


def test_data_quality_names_missing_values_out_of_range_and_new_categories(
    reference: pd.DataFrame, data_params: DataParams, monitor_params: MonitorParams
) -> None:
    window = generate(3000, seed=4)
    window.loc[:599, "age"] = np.nan
    window.loc[:9, "tenure_months"] = 500.0
    window.loc[:4, "region"] = "atlantis"
    result = drift(reference, window, data_params, monitor_params)
    quality = {q.column: q for q in result.quality}
    assert quality["age"].missing_share > 0.2 > quality["age"].reference_missing_share
    assert quality["tenure_months"].out_of_range == 10
    assert quality["region"].new_categories == ("atlantis",)
    assert quality["plan_tier"].new_categories == ()
    assert quality["plan_tier"].out_of_range == 0
    assert "region new ['atlantis']" in result.summary()


def test_a_feature_with_no_values_in_the_window_is_drifted_not_an_error(
    reference: pd.DataFrame, data_params: DataParams, monitor_params: MonitorParams
) -> None:
    window = generate(3000, seed=4)
    window["age"] = np.nan  # an upstream change dropped the column's values
    window["region"] = None
    result = drift(reference, window, data_params, monitor_params)
    features = {c.column: c for c in result.features}
    for name in ("age", "region"):
        assert features[name].drifted
        assert features[name].method == "no_values"
        assert features[name].score == 1.0
    assert not features["tenure_months"].drifted
    quality = {q.column: q for q in result.quality}
    assert quality["age"].missing_share == 1.0
    assert quality["region"].missing_share == 1.0


def test_headline_rows_carry_share_scores_and_performance(
    reference: pd.DataFrame, model: Pipeline, data_params: DataParams, monitor_params: MonitorParams
) -> None:
    window = scored(generate(3000, seed=5), model, data_params)
    rows = drift(reference, window, data_params, monitor_params).to_rows()
    by_key = {(r.metric, r.column): r.value for r in rows}
    assert by_key[("current_rows", None)] == 3000
    assert by_key[("labelled_rows", None)] == 3000
    assert 0 <= by_key[("share_drifted", None)] <= 1
    assert ("drift_score", "age") in by_key
    assert ("prediction_drift_score", "proba_1") in by_key
    assert 0.5 < by_key[("roc_auc", None)] <= 1
    assert all(isinstance(r.value, int | float) for r in rows)


def test_sampling_a_large_window_keeps_the_verdicts(
    reference: pd.DataFrame, data_params: DataParams, monitor_params: MonitorParams
) -> None:
    window = generate(60000, seed=6, drift=Drift(covariate={"age": 0.3, "region": 0.3}))
    full = drift(reference, window, data_params, monitor_params)
    sampled_params = monitor_params.model_copy(update={"sample_rows": 20000})
    sampled = drift(reference, window, data_params, sampled_params)
    assert sampled.tested_rows == 20000
    assert full.tested_rows == 60000
    assert [c.drifted for c in sampled.features] == [c.drifted for c in full.features]


def _result_for(columns: list[str]) -> DriftResult:
    return DriftResult(
        reference_rows=2000,
        current_rows=2000,
        tested_rows=2000,
        enough_rows=True,
        drift_share_threshold=0.5,
        features=tuple(
            ColumnDrift(c, "numeric", "wasserstein", 0.01 * i, 0.1, False)
            for i, c in enumerate(columns)
        ),
        quality=tuple(ColumnQuality(c, 0.0, 0.0, i) for i, c in enumerate(columns)),
    )


def test_columns_that_differ_only_in_punctuation_keep_metrics_of_their_own() -> None:
    columns = ["bill_length", "bill/length", "bill:length", "bill length (mm)", "bill length _mm_"]
    result = _result_for(columns)

    metrics = result.metrics()

    assert len(metrics) == len(result.to_rows())  # no column's number overwrote another's
    assert metrics["drift_score.bill_length"] == 0.0  # a name MLflow takes stays as it is
    assert metrics["out_of_range.bill length _mm_"] == 4
    scores = sorted(v for k, v in metrics.items() if k.startswith("drift_score."))
    assert scores == pytest.approx([0.0, 0.01, 0.02, 0.03, 0.04])
    for name in metrics:
        _validate_metric_name(name)  # type: ignore[no-untyped-call]  # raises if MLflow refuses it
    assert set(_result_for(list(reversed(columns))).metrics()) == set(metrics)  # in any order


def test_performance_on_labelled_rows_only() -> None:
    y = np.array([1, 0, 1, 1, np.nan, 0], dtype=object)
    pred = np.array([1, 0, 0, 1, 1, 1])
    proba = np.array([0.9, 0.2, 0.4, 0.8, 0.7, 0.6])
    result = performance(y, pred, proba, [0, 1])
    assert result["n_labelled"] == 5
    assert result["accuracy"] == pytest.approx(0.6)
    assert result["confusion_matrix"] == [[1, 1], [1, 2]]
    assert result["roc_auc"] == pytest.approx(
        roc_auc_score([1, 0, 1, 1, 0], [0.9, 0.2, 0.4, 0.8, 0.6])
    )


def test_evidently_classification_metrics_agree_with_scikit_learn(
    model: Pipeline, data_params: DataParams
) -> None:
    window = scored(generate(4000, seed=9, drift=Drift(concept=0.5)), model, data_params)
    ours = performance(
        window["churned"].to_numpy(),
        window["predicted"].to_numpy(),
        window["proba_1"].to_numpy(),
        [0, 1],
    )
    definition = DataDefinition(
        numerical_columns=["proba_1"],
        categorical_columns=["churned", "predicted"],
        classification=[
            BinaryClassification(
                target="churned",
                prediction_labels="predicted",
                prediction_probas="proba_1",
                pos_label=1,
            )
        ],
    )
    frame = window[["churned", "predicted", "proba_1"]]
    snapshot = Report([ClassificationPreset()]).run(
        Dataset.from_pandas(frame, data_definition=definition), None
    )
    values = {
        m["config"]["type"].rsplit(":", 1)[-1]: m["value"] for m in snapshot.dict()["metrics"]
    }
    assert values["Accuracy"] == pytest.approx(ours["accuracy"], abs=1e-12)
    assert values["RocAuc"] == pytest.approx(ours["roc_auc"], abs=1e-12)
    assert np.mean(list(values["F1ByLabel"].values())) == pytest.approx(ours["f1_macro"], abs=1e-12)
    assert values["F1Score"] == pytest.approx(
        f1_score(window["churned"], window["predicted"]), abs=1e-12
    )
    assert ours["accuracy"] == accuracy_score(window["churned"], window["predicted"])
