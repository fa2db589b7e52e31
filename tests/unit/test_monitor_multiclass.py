"""Monitoring a multiclass model: every class's probability is tested for drift."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline

from common.params import DataParams, MonitorParams, Params
from models.data import model_frame
from models.drift import class_columns, drift
from models.generate import generate
from models.train import build, scored_holdout
from tests.penguins import DATA, SPECIES, TARGET, penguins

PROBAS = [f"proba_{s}" for s in SPECIES]


@pytest.fixture(scope="module")
def data() -> DataParams:
    return DataParams(**DATA)


@pytest.fixture(scope="module")
def monitor_params(params: Params) -> MonitorParams:
    return params.monitor


@pytest.fixture(scope="module")
def model(data: DataParams, params: Params) -> Pipeline:
    df = penguins(3_000, seed=0)
    small = params.train.model_copy(update={"n_estimators": 20})
    return build(data, small).fit(model_frame(df, data), df[TARGET])


@pytest.fixture(scope="module")
def reference(model: Pipeline, data: DataParams, monitor_params: MonitorParams) -> pd.DataFrame:
    return scored_holdout(model, penguins(3_000, seed=1), data, monitor_params)


def window(
    model: Pipeline,
    data: DataParams,
    seed: int,
    mix: tuple[float, float, float] = (0.45, 0.2, 0.35),
) -> pd.DataFrame:
    """Logged traffic as the flow reads it back: the same columns as the reference."""
    return scored_holdout(model, penguins(2_000, seed=seed, mix=mix), data, MonitorParams())


def test_the_reference_of_a_multiclass_model_holds_every_class_probability(
    reference: pd.DataFrame, model: Pipeline, data: DataParams
) -> None:
    assert [c for c in reference.columns if c.startswith("proba_")] == PROBAS
    np.testing.assert_allclose(reference[PROBAS].sum(axis=1), 1.0)
    assert set(reference["predicted"]) == set(SPECIES)
    assert class_columns(reference, data) == dict(zip(PROBAS, SPECIES, strict=True))


def test_the_reference_of_a_binary_model_keeps_its_one_probability_column(
    params: Params,
) -> None:
    df = generate(1_500, seed=2)
    small = params.train.model_copy(update={"n_estimators": 5})
    binary = build(params.data, small).fit(model_frame(df, params.data), df["churned"])
    scored = scored_holdout(binary, df.head(300), params.data, params.monitor)
    assert [c for c in scored.columns if c.startswith("proba_")] == [
        params.monitor.probability_column
    ]
    assert class_columns(scored, params.data) == {}


def test_a_calm_window_tests_every_class_probability_and_flags_none(
    reference: pd.DataFrame, model: Pipeline, data: DataParams, monitor_params: MonitorParams
) -> None:
    result = drift(
        reference, window(model, data, seed=5).drop(columns=TARGET), data, monitor_params
    )
    assert [c.column for c in result.prediction] == ["predicted", *PROBAS]
    assert all(c.kind == "numeric" for c in result.prediction[1:])
    assert result.prediction_drift is False, result.summary()


def test_a_shifted_class_mix_is_probability_drift_of_the_classes_that_moved(
    reference: pd.DataFrame, model: Pipeline, data: DataParams, monitor_params: MonitorParams
) -> None:
    current = window(model, data, seed=6, mix=(0.2, 0.1, 0.7)).drop(columns=TARGET)
    result = drift(reference, current, data, monitor_params)
    drifted = {c.column for c in result.prediction if c.drifted}
    assert {"proba_Adelie", "proba_Gentoo"} <= drifted
    assert result.prediction_drift is True
    rows = {(m.metric, m.column) for m in result.to_rows()}
    assert {("prediction_drift_score", p) for p in PROBAS} <= rows
    assert {("prediction_drifted", p) for p in PROBAS} <= rows


def test_window_performance_is_one_vs_rest_over_every_class(
    reference: pd.DataFrame, model: Pipeline, data: DataParams, monitor_params: MonitorParams
) -> None:
    current = window(model, data, seed=7)
    result = drift(reference, current, data, monitor_params)
    assert result.performance is not None
    expected = roc_auc_score(
        current[TARGET], current[PROBAS].to_numpy(), multi_class="ovr", labels=list(SPECIES)
    )
    assert result.performance["roc_auc"] == pytest.approx(expected)
    assert result.performance["classes"] == list(SPECIES)
