"""Shared unit fixtures: the repository's own params, so tests follow the real contract."""

from __future__ import annotations

import pandas as pd
import pytest
from sklearn.pipeline import Pipeline

from common.params import DataParams, MonitorParams, Params, ValidateParams, load_params
from models.data import model_frame
from models.generate import generate
from models.train import build
from tests.workspace import ROOT


@pytest.fixture(scope="session")
def params() -> Params:
    return load_params(ROOT / "params.yaml")


@pytest.fixture(scope="session")
def data_params(params: Params) -> DataParams:
    return params.data


@pytest.fixture(scope="session")
def validate_params(params: Params) -> ValidateParams:
    return params.validate_


@pytest.fixture(scope="session")
def monitor_params(params: Params) -> MonitorParams:
    return params.monitor


@pytest.fixture(scope="session")
def model(params: Params) -> Pipeline:
    """A small version of the real pipeline, trained on other rows than the reference."""
    train = generate(8000, seed=7)
    small = params.train.model_copy(update={"n_estimators": 25})
    return build(params.data, small).fit(model_frame(train, params.data), train["churned"])


@pytest.fixture(scope="session")
def reference(model: Pipeline, data_params: DataParams) -> pd.DataFrame:
    """The scored holdout a version carries: features, label, prediction, probability."""
    df = generate(20000, seed=1)
    proba = model.predict_proba(model_frame(df, data_params))[:, 1]
    return df.assign(predicted=(proba >= 0.5).astype(int), proba_1=proba)
