"""ONNX export: same probabilities as sklearn, missing values included; the check can fail."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pandas as pd
import pytest
from sklearn.pipeline import Pipeline

from common.params import DataParams, FeatureSpec, Params, TrainParams
from models import export
from models.data import MISSING_CATEGORY, model_frame
from models.generate import TARGET, Drift, generate
from models.predict import ONNX_INPUTS_KEY
from models.train import build
from tests.penguins import DATA as PENGUINS
from tests.penguins import penguins


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


def test_input_names_keep_identifiers_and_make_the_others_unique_identifiers() -> None:
    columns = ["tenure_months", "bill length (mm)", "flipper.length", "3d_score", "a b", "a.b", ""]

    names = export.input_names(columns)

    assert names == {
        "tenure_months": "tenure_months",
        "bill length (mm)": "bill_length__mm_",
        "flipper.length": "flipper_length",
        "3d_score": "_3d_score",
        "a b": "a_b",
        "a.b": "a_b1",
        "": "_",
    }
    assert all(n.isidentifier() for n in names.values())
    assert export.input_names(columns) == names


@pytest.fixture(scope="module")
def penguin_data() -> DataParams:
    return DataParams(**PENGUINS)


@pytest.fixture(scope="module")
def penguin_pipeline(penguin_data: DataParams, train_params: TrainParams) -> Pipeline:
    df = penguins(1_500, seed=3)
    return build(penguin_data, train_params).fit(model_frame(df, penguin_data), df["species"])


def test_odd_column_names_get_valid_onnx_inputs_recorded_in_the_model(
    penguin_pipeline: Pipeline, penguin_data: DataParams, params: Params
) -> None:
    onnx_bytes = export.export(penguin_pipeline, penguin_data)
    model = onnx.load_from_string(onnx_bytes)
    names = export.input_names(penguin_data.feature_names)
    assert [i.name for i in model.graph.input] == list(names.values())
    recorded = {p.key: p.value for p in model.metadata_props}
    assert json.loads(recorded[ONNX_INPUTS_KEY]) == names

    rows = model_frame(penguins(400, seed=4), penguin_data)
    parity = export.check_parity(
        penguin_pipeline, onnx_bytes, rows, penguin_data, params.train.onnx_parity_atol
    )
    assert parity.passed, parity
    proba = export.predict_proba(export.session(onnx_bytes), rows, penguin_data)
    assert proba.shape == (400, 3)


def test_inputs_renamed_away_from_skl2onnx_names_are_wired_through_the_graph(
    train_params: TrainParams, params: Params
) -> None:
    """skl2onnx keeps "+" in a name; the export renames that input wherever it is read."""
    data = DataParams(
        path="x.csv",
        target="species",
        features={
            "bill+length": FeatureSpec(type="numeric"),
            "island name": FeatureSpec(type="categorical"),
        },
    )
    df = penguins(800, seed=5).rename(columns={"bill length (mm)": "bill+length"})
    pipeline = build(data, train_params).fit(model_frame(df, data), df["species"])
    onnx_bytes = export.export(pipeline, data)
    assert [i.name for i in onnx.load_from_string(onnx_bytes).graph.input] == [
        "bill_length",
        "island_name",
    ]
    parity = export.check_parity(
        pipeline, onnx_bytes, model_frame(df, data), data, params.train.onnx_parity_atol
    )
    assert parity.passed, parity


def test_a_model_exported_without_the_input_mapping_is_fed_by_column_names(
    pipeline: Pipeline,
    onnx_bytes: bytes,
    rows: pd.DataFrame,
    data_params: DataParams,
    params: Params,
) -> None:
    older = onnx.load_from_string(onnx_bytes)
    del older.metadata_props[:]

    parity = export.check_parity(
        pipeline, older.SerializeToString(), rows, data_params, params.train.onnx_parity_atol
    )

    assert parity.passed, parity
