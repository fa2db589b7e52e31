"""ONNX export: same probabilities as sklearn, missing values included; the check can fail."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.pipeline import Pipeline

from common.params import DataParams, Params, TrainParams
from models import export
from models.data import MISSING_CATEGORY, model_frame
from models.generate import TARGET, Drift, generate
from models.train import build


@pytest.fixture(scope="module")
def train_params(params: Params) -> TrainParams:
    return TrainParams(**(params.train.model_dump() | {"n_estimators": 25}))


def fitted(df: pd.DataFrame, data: DataParams, train_params: TrainParams) -> Pipeline:
    return build(data, train_params).fit(model_frame(df, data), df[TARGET])


@pytest.fixture(scope="module")
def pipeline(data_params: DataParams, train_params: TrainParams) -> Pipeline:
    return fitted(generate(1_500, seed=3), data_params, train_params)


@pytest.fixture(scope="module")
def onnx_bytes(pipeline: Pipeline, data_params: DataParams) -> bytes:
    return export.export(pipeline, data_params)


@pytest.fixture(scope="module")
def rows(data_params: DataParams) -> pd.DataFrame:
    """Fresh rows plus rows where every numeric is NaN and every category is missing."""
    df = generate(400, seed=4)
    holes = df.head(6).copy()
    holes[data_params.numeric] = np.nan
    holes[data_params.categorical] = None
    holes.loc[holes.index[:3], data_params.categorical] = ""
    unseen = df.head(2).assign(region="atlantis")
    return model_frame(pd.concat([df, holes, unseen], ignore_index=True), data_params)


def test_onnx_matches_sklearn_including_missing_values(
    pipeline: Pipeline,
    onnx_bytes: bytes,
    rows: pd.DataFrame,
    data_params: DataParams,
    params: Params,
) -> None:
    assert rows[data_params.numeric].isna().all(axis=1).sum() == 6
    assert (rows[data_params.categorical] == MISSING_CATEGORY).all(axis=1).sum() == 6

    parity = export.check_parity(
        pipeline, onnx_bytes, rows, data_params, params.train.onnx_parity_atol
    )

    assert parity.passed, parity
    assert parity.rows == len(rows)
    assert parity.label_mismatches == 0


def test_onnx_gives_one_probability_per_class(
    onnx_bytes: bytes, rows: pd.DataFrame, data_params: DataParams
) -> None:
    proba = export.predict_proba(export.session(onnx_bytes), rows, data_params)
    assert proba.shape == (len(rows), 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)


def test_parity_fails_when_the_tolerance_is_below_float32_precision(
    pipeline: Pipeline, onnx_bytes: bytes, rows: pd.DataFrame, data_params: DataParams
) -> None:
    parity = export.check_parity(pipeline, onnx_bytes, rows, data_params, atol=1e-12)
    assert parity.max_abs_diff > 1e-12
    assert not parity.passed


def test_parity_fails_against_a_different_model(
    pipeline: Pipeline,
    rows: pd.DataFrame,
    data_params: DataParams,
    train_params: TrainParams,
    params: Params,
) -> None:
    other = fitted(generate(1_500, seed=9, drift=Drift(concept=1.0)), data_params, train_params)
    parity = export.check_parity(
        pipeline,
        export.export(other, data_params),
        rows,
        data_params,
        params.train.onnx_parity_atol,
    )
    assert parity.max_abs_diff > 0.05
    assert parity.label_mismatches > 0
    assert not parity.passed
