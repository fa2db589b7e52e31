"""prepare: a split that keeps every row on its side as data grows, production rows appended."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from common.errors import UserError
from common.params import DataParams, PrepareParams
from models.generate import generate
from models.prepare import combine, production_rows, split

pytestmark = pytest.mark.unit

PREPARE = PrepareParams(holdout_share=0.2, reference_rows=500, seed=42)


def test_adding_rows_never_moves_an_old_row_across_the_split(data_params: DataParams) -> None:
    old = generate(3000, seed=1)
    new = pd.concat([old, generate(1000, seed=2)], ignore_index=True)
    before, after = split(old, data_params, PREPARE), split(new, data_params, PREPARE)
    ids = data_params.id_column
    assert set(before.holdout[ids]) <= set(after.holdout[ids])
    assert set(before.train[ids]) <= set(after.train[ids])
    assert 0.17 < len(after.holdout) / len(new) < 0.23


def test_the_split_is_the_same_on_a_rerun(data_params: DataParams) -> None:
    df = generate(2000, seed=3)
    a, b = split(df, data_params, PREPARE), split(df, data_params, PREPARE)
    pd.testing.assert_frame_equal(a.holdout, b.holdout)
    pd.testing.assert_frame_equal(a.reference, b.reference)


def test_production_rows_join_the_raw_table_with_its_types(
    data_params: DataParams, tmp_path: Path
) -> None:
    raw = generate(100, seed=4)
    prod = generate(30, seed=5).astype({"churned": str})  # labels come back as text
    prod = pd.concat([prod, prod.tail(5)], ignore_index=True)  # a row exported twice
    folder = tmp_path / "production"
    folder.mkdir()
    prod.to_parquet(folder / "labelled.parquet")
    params = data_params.model_copy(update={"production_dir": str(folder)})

    combined = combine(raw, production_rows(params), params)

    assert len(combined) == 130
    assert combined["churned"].dtype == raw["churned"].dtype
    assert list(combined.columns) == list(raw.columns)


def test_production_rows_without_a_raw_column_are_refused_naming_it(
    data_params: DataParams, tmp_path: Path
) -> None:
    prod = generate(10, seed=6).drop(columns=["age"])
    prod.to_parquet(tmp_path / "labelled.parquet")
    params = data_params.model_copy(update={"production_dir": str(tmp_path)})
    with pytest.raises(UserError, match=r"age"):
        combine(generate(10, seed=7), production_rows(params), params)


def test_no_production_dir_means_the_raw_table_only(data_params: DataParams) -> None:
    params = data_params.model_copy(update={"production_dir": None})
    assert production_rows(params) is None
