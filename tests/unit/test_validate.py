"""The data contract: each rule names the column, the rule and example rows; clean data passes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common import paths
from common.errors import UserError
from common.params import DataParams, ValidateParams
from models import validate
from models.generate import generate
from models.validate import Problem, Report, check

SOURCE = "data/incoming/customers.csv"
BAD_ROWS = [5, 17, 230]
"""1-based raw row numbers, as prepare numbers them; the report must point at these."""


@pytest.fixture
def data(data_params: DataParams) -> DataParams:
    return data_params.model_copy(update={"path": SOURCE})


@pytest.fixture
def rules(validate_params: ValidateParams) -> ValidateParams:
    return validate_params.model_copy(update={"min_rows": 100, "examples": 3})


@pytest.fixture
def clean() -> pd.DataFrame:
    df = generate(400, seed=11)
    df.index = pd.RangeIndex(1, len(df) + 1, name="row")
    return df


def only(report: Report, rule: str) -> Problem:
    """The one problem with this rule; fails if the contract found anything else."""
    assert [p.rule for p in report.problems] == [rule], report.message()
    return report.problems[0]


def rows_of(problem: Problem) -> list[int]:
    return [int(e["row"]) for e in problem.examples]


def test_clean_data_meets_the_contract(
    clean: pd.DataFrame, data: DataParams, rules: ValidateParams
) -> None:
    report = check(clean, data, rules)
    assert report.passed, report.message()
    assert report.rows == 400
    assert report.source == SOURCE


def test_reports_a_missing_column_by_name(
    clean: pd.DataFrame, data: DataParams, rules: ValidateParams
) -> None:
    problem = only(check(clean.drop(columns="monthly_charges"), data, rules), "required column")
    assert problem.column == "monthly_charges"
    assert "tenure_months" in problem.detail  # says what the file does have


def test_reports_a_missing_target_column(
    clean: pd.DataFrame, data: DataParams, rules: ValidateParams
) -> None:
    problem = only(check(clean.drop(columns="churned"), data, rules), "required column")
    assert problem.column == "churned"


def test_rejects_text_in_a_numeric_column(
    clean: pd.DataFrame, data: DataParams, rules: ValidateParams
) -> None:
    df = clean.astype({"tenure_months": object})
    df.loc[BAD_ROWS, "tenure_months"] = "twelve"
    problem = only(check(df, data, rules), "numeric type")
    assert problem.column == "tenure_months"
    assert problem.count == 3
    assert rows_of(problem) == BAD_ROWS
    assert {e["value"] for e in problem.examples} == {"twelve"}


def test_accepts_numbers_written_as_text(
    clean: pd.DataFrame, data: DataParams, rules: ValidateParams
) -> None:
    df = clean.astype({"tenure_months": str}).replace("nan", np.nan)
    assert check(df, data, rules).passed


def test_rejects_a_numeric_column_of_the_wrong_type(
    clean: pd.DataFrame, data: DataParams, rules: ValidateParams
) -> None:
    df = clean.assign(num_products=clean["num_products"] > 2)
    problem = only(check(df, data, rules), "numeric type")
    assert problem.column == "num_products"
    assert "bool" in problem.detail


def test_rejects_values_outside_the_range(
    clean: pd.DataFrame, data: DataParams, rules: ValidateParams
) -> None:
    df = clean.copy()
    df.loc[BAD_ROWS, "age"] = [150.0, 7.0, -1.0]
    problem = only(check(df, data, rules), "range 18..120")
    assert problem.column == "age"
    assert problem.count == 3
    assert rows_of(problem) == BAD_ROWS
    assert [e["value"] for e in problem.examples] == [150.0, 7.0, -1.0]


def test_range_bounds_are_inclusive(
    clean: pd.DataFrame, data: DataParams, rules: ValidateParams
) -> None:
    df = clean.copy()
    df.loc[BAD_ROWS[:2], "age"] = [18.0, 120.0]
    assert check(df, data, rules).passed


def test_rejects_rows_with_unknown_category(
    clean: pd.DataFrame, data: DataParams, rules: ValidateParams
) -> None:
    df = clean.copy()
    df.loc[BAD_ROWS, "region"] = "atlantis"
    problem = only(check(df, data, rules), "allowed categories")
    assert problem.column == "region"
    assert "atlantis" in problem.detail
    assert rows_of(problem) == BAD_ROWS


def test_missing_and_empty_categories_are_not_unknown(
    clean: pd.DataFrame, data: DataParams, rules: ValidateParams
) -> None:
    df = clean.copy()
    df.loc[BAD_ROWS[:2], "region"] = [None, ""]
    assert check(df, data, rules).passed


def test_rejects_a_feature_with_too_many_missing_values(
    clean: pd.DataFrame, data: DataParams, rules: ValidateParams
) -> None:
    df = clean.copy()
    df.loc[df.index[:200], "monthly_charges"] = np.nan
    problem = only(check(df, data, rules), "missing share")
    assert problem.column == "monthly_charges"
    assert problem.count == 200
    assert "50.0% missing" in problem.detail
    assert "25.0%" in problem.detail


def test_a_feature_can_allow_more_missing_values_than_the_default(
    clean: pd.DataFrame, data: DataParams, rules: ValidateParams
) -> None:
    assert data.features["satisfaction_score"].max_missing_share == 0.4
    df = clean.assign(satisfaction_score=clean["satisfaction_score"].fillna(7.0))
    df.loc[df.index[:140], "satisfaction_score"] = np.nan  # 35%: over 25%, under 40%
    assert check(df, data, rules).passed
    df.loc[df.index[:200], "satisfaction_score"] = np.nan  # 50%
    assert only(check(df, data, rules), "missing share").column == "satisfaction_score"


def test_rejects_duplicate_ids(
    clean: pd.DataFrame, data: DataParams, rules: ValidateParams
) -> None:
    df = clean.copy()
    df.loc[BAD_ROWS, "customer_id"] = df.loc[1, "customer_id"]
    problem = only(check(df, data, rules), "duplicates")
    assert problem.column == "customer_id"
    assert problem.count == 3
    assert rows_of(problem) == BAD_ROWS


def test_rejects_too_few_rows(clean: pd.DataFrame, data: DataParams, rules: ValidateParams) -> None:
    problem = only(check(clean.head(99), data, rules), "row count")
    assert "99 rows" in problem.detail
    assert "100" in problem.detail


def test_rejects_a_target_with_a_single_class(
    clean: pd.DataFrame, data: DataParams, rules: ValidateParams
) -> None:
    problem = only(check(clean.assign(churned=0), data, rules), "two or more classes")
    assert problem.column == "churned"
    assert "[0]" in problem.detail


def test_rejects_rows_without_a_label(
    clean: pd.DataFrame, data: DataParams, rules: ValidateParams
) -> None:
    df = clean.astype({"churned": float})
    df.loc[BAD_ROWS, "churned"] = np.nan
    problem = only(check(df, data, rules), "target present")
    assert rows_of(problem) == BAD_ROWS


def test_rejects_infinite_values_once(
    clean: pd.DataFrame, data: DataParams, rules: ValidateParams
) -> None:
    df = clean.copy()
    df.loc[BAD_ROWS, "total_charges"] = [np.inf, -np.inf, np.inf]
    problem = only(check(df, data, rules), "finite")  # not also "out of range"
    assert problem.column == "total_charges"
    assert rows_of(problem) == BAD_ROWS


def test_reports_every_problem_not_just_the_first(
    clean: pd.DataFrame, data: DataParams, rules: ValidateParams
) -> None:
    df = clean.drop(columns="plan_tier")
    df.loc[BAD_ROWS, "age"] = 200.0
    df.loc[BAD_ROWS, "region"] = "atlantis"
    found = {(p.column, p.rule) for p in check(df, data, rules).problems}
    assert found == {
        ("plan_tier", "required column"),
        ("age", "range 18..120"),
        ("region", "allowed categories"),
    }


def _text_in_numbers(df: pd.DataFrame) -> pd.DataFrame:
    df = df.astype({"tenure_months": object})
    df.loc[BAD_ROWS, "tenure_months"] = "12\nmonths"
    return df


def _unknown_category(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df.loc[BAD_ROWS, "region"] = "north\nwest"
    return df


def _several(df: pd.DataFrame) -> pd.DataFrame:
    df = _unknown_category(df.drop(columns="age")).assign(churned=1)
    df.loc[BAD_ROWS, "total_charges"] = np.inf
    return df


@pytest.mark.parametrize(
    ("corrupt", "names"),
    [
        (_text_in_numbers, ["tenure_months", "numeric type", "row 5"]),
        (_unknown_category, ["region", "allowed categories", "row 17"]),
        (_several, ["age", "region", "churned", "total_charges", "4 problems"]),
    ],
    ids=["text-in-numbers", "unknown-category", "several-problems"],
)
def test_message_is_one_paragraph_naming_the_file_and_the_column(
    corrupt: Callable[[pd.DataFrame], pd.DataFrame],
    names: list[str],
    clean: pd.DataFrame,
    data: DataParams,
    rules: ValidateParams,
) -> None:
    message = check(corrupt(clean), data, rules).message()
    assert "\n" not in message
    assert message.startswith(SOURCE)
    for name in names:
        assert name in message


def test_stage_writes_the_report_and_stops_on_bad_data(
    clean: pd.DataFrame,
    data: DataParams,
    rules: ValidateParams,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    paths.PREPARED.mkdir(parents=True)
    bad = clean.copy()
    bad.loc[BAD_ROWS, "region"] = "atlantis"
    bad.iloc[:300].to_parquet(paths.TRAIN)
    bad.iloc[300:].to_parquet(paths.HOLDOUT)

    with pytest.raises(UserError, match=r"column 'region' \[allowed categories\]") as err:
        validate.run(data, rules)

    assert SOURCE in str(err.value)
    written = json.loads(paths.VALIDATION_REPORT.read_text())
    assert written["passed"] is False
    assert written["rows"] == 400
    assert written["problems"][0]["column"] == "region"
    assert [e["row"] for e in written["problems"][0]["examples"]] == BAD_ROWS


def test_stage_passes_clean_data(
    clean: pd.DataFrame,
    data: DataParams,
    rules: ValidateParams,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    paths.PREPARED.mkdir(parents=True)
    clean.iloc[:300].to_parquet(paths.TRAIN)
    clean.iloc[300:].to_parquet(paths.HOLDOUT)
    assert validate.run(data, rules).passed
    assert json.loads(paths.VALIDATION_REPORT.read_text())["passed"] is True


def test_a_tenants_rows_meet_the_same_contract_and_its_message_names_the_tenant(
    clean: pd.DataFrame,
    data: DataParams,
    rules: ValidateParams,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    acme = paths.layout("acme")
    acme.PREPARED.mkdir(parents=True)
    bad = clean.copy()
    bad.loc[BAD_ROWS, "region"] = "atlantis"
    bad.iloc[:300].to_parquet(acme.TRAIN)
    bad.iloc[300:].to_parquet(acme.HOLDOUT)

    with pytest.raises(UserError) as err:
        validate.run(data, rules, acme)

    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"tenant 'acme': {SOURCE} failed the data contract (1 problem)")
    assert f"Full report: {acme.VALIDATION_REPORT}." in message
    assert json.loads(acme.VALIDATION_REPORT.read_text())["tenant"] == "acme"
    assert not paths.VALIDATION_REPORT.exists()  # the shared model's report is untouched
