"""Shared unit fixtures: the repository's own params, so tests follow the real contract."""

from __future__ import annotations

import pytest

from common.params import DataParams, Params, ValidateParams, load_params
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
