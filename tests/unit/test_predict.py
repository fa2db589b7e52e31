"""Scoring and request validation from a logged model: ONNX and sklearn agree on records."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import mlflow.sklearn
import numpy as np
import onnx
import pandas as pd
import pytest
from mlflow.models import infer_signature
from pydantic import BaseModel, ValidationError
from sklearn.pipeline import Pipeline

from common.params import DataParams, Params, TrainParams
from common.registry.tags import MANIFEST_SHA256
from models import export, manifest, train
from models.data import model_frame
from models.generate import TARGET, Drift, generate
from models.predict import (
    CONTRACT_ARTIFACT,
    ONNX_ARTIFACT,
    Kind,
    ModelError,
    Schema,
    Scorer,
    out_of_range,
    record_model,
    validate_records,
)
from tests.penguins import DATA as PENGUINS
from tests.penguins import penguins


def save_model_dir(
    pipeline: Pipeline, data: DataParams, train_df: pd.DataFrame, path: Path
) -> Path:
    """Save a model directory the way train.run logs it (signature, example, extra files)."""
    extra = path.with_name(f"{path.name}-extra")
    extra.mkdir(parents=True)
    (extra / train.ONNX_FILE).write_bytes(export.export(pipeline, data))
    train_df.head(200).to_parquet(extra / train.REFERENCE_FILE)
    example = model_frame(train_df, data).head(5)
    mlflow.sklearn.save_model(
        pipeline,
        str(path),
        signature=infer_signature(example, pipeline.predict_proba(example)),
        input_example=example,
        pyfunc_predict_fn="predict_proba",
        pip_requirements=["scikit-learn"],
        extra_files=[str(extra / train.ONNX_FILE), str(extra / train.REFERENCE_FILE)],
        skops_trusted_types=train.SKOPS_TRUSTED,
    )
    manifest.write(path)  # sealed, as train.run seals what it logged
    return path


def sealed(path: Path) -> dict[str, str]:
    """The tags registering `path` (saved by save_model_dir) as the register stage would:
    its manifest's SHA-256."""
    return {MANIFEST_SHA256: manifest.file_sha256(path / manifest.MANIFEST_FILE)}


def as_bundle(path: Path, **tags: str) -> Path:
    """`path` (saved by save_model_dir) as `ServedModel.bundle` leaves one: its tags file."""
    from common.registry.served import TAGS_FILE  # noqa: PLC0415 (served imports this module's)

    (path / TAGS_FILE).write_text(json.dumps({**sealed(path), **tags}))
    return path


def fitted(df: pd.DataFrame, data: DataParams, params: Params) -> Pipeline:
    small = TrainParams(**(params.train.model_dump() | {"n_estimators": 25}))
    return train.build(data, small).fit(model_frame(df, data), df[TARGET])


def as_records(df: pd.DataFrame, data: DataParams) -> list[dict[str, Any]]:
    """Rows as a JSON request carries them: missing values are None, not NaN."""
    return [
        {str(k): None if pd.isna(v) else v for k, v in row.items()}
        for row in df[data.feature_names].to_dict(orient="records")
    ]


def training_rows() -> pd.DataFrame:
    """Generated rows where a missing payment method means churn.

    The model then leans on the missing category, so filling a missing category the wrong
    way shows in its scores (with uninformative missingness the trees may never split on it).
    """
    df = generate(3_000, seed=1)
    df.loc[df["payment_method"].isna(), TARGET] = 1
    return df


@pytest.fixture(scope="module")
def pipeline(data_params: DataParams, params: Params) -> Pipeline:
    return fitted(training_rows(), data_params, params)


@pytest.fixture(scope="module")
def model_dir(
    pipeline: Pipeline, data_params: DataParams, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return save_model_dir(
        pipeline, data_params, training_rows(), tmp_path_factory.mktemp("m") / "model"
    )


@pytest.fixture(scope="module")
def onnx_scorer(model_dir: Path) -> Scorer:
    return Scorer.load(model_dir, prefer_onnx=True)


@pytest.fixture(scope="module")
def sklearn_scorer(model_dir: Path) -> Scorer:
    return Scorer.load(model_dir, prefer_onnx=False)


@pytest.fixture(scope="module")
def rows(data_params: DataParams) -> pd.DataFrame:
    """2,000 fresh rows, plus rows with every value missing (None and "") and an unseen region."""
    df = generate(2_000, seed=7)
    holes = df.head(6).copy()
    holes[data_params.numeric] = np.nan
    holes[data_params.categorical] = None
    holes.loc[holes.index[:3], data_params.categorical] = ""
    unseen = df.head(2).assign(region="atlantis")
    return pd.concat([df, holes, unseen], ignore_index=True)


@pytest.fixture(scope="module")
def records(rows: pd.DataFrame, data_params: DataParams) -> list[dict[str, Any]]:
    return as_records(rows, data_params)


@pytest.fixture(scope="module")
def expected(pipeline: Pipeline, rows: pd.DataFrame, data_params: DataParams) -> np.ndarray:
    """What training-time code computes: the pipeline on model_frame."""
    return np.asarray(pipeline.predict_proba(model_frame(rows, data_params)))


def good_record(scorer: Scorer) -> dict[str, Any]:
    return {
        name: 1.0 if kind == "numeric" else scorer.categories[name][0]
        for name, kind in scorer.features
    }


# Scoring


def test_onnx_and_sklearn_paths_match_training_code_including_missing_values(
    onnx_scorer: Scorer,
    sklearn_scorer: Scorer,
    records: list[dict[str, Any]],
    expected: np.ndarray,
) -> None:
    assert sum(r["satisfaction_score"] is None for r in records) > 100
    assert sum(r["payment_method"] is None for r in records) > 20
    assert onnx_scorer.backend == "onnx"
    assert sklearn_scorer.backend == "sklearn"

    np.testing.assert_allclose(onnx_scorer.proba(records), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(sklearn_scorer.proba(records), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    ("kind", "fill"), [("numeric", 0.0), ("categorical", "None"), ("categorical", "")]
)
def test_the_agreement_check_catches_missing_values_filled_the_wrong_way(
    onnx_scorer: Scorer,
    records: list[dict[str, Any]],
    expected: np.ndarray,
    kind: str,
    fill: object,
) -> None:
    """Zero for a missing number, or "None" for a missing category, changes the scores.

    ("" is the one fill model_frame treats as missing, so it must change nothing.)
    """
    kinds = dict(onnx_scorer.features)
    wrong = [
        {k: fill if v is None and kinds[k] == kind else v for k, v in r.items()} for r in records
    ]
    changed = np.abs(onnx_scorer.proba(wrong) - expected).max(axis=1) > 1e-3
    if fill == "":
        assert not changed.any()
    else:
        assert changed.sum() > 20


def test_nan_and_none_are_the_same_missing_number(
    onnx_scorer: Scorer, sklearn_scorer: Scorer, rows: pd.DataFrame, data_params: DataParams
) -> None:
    with_none = as_records(rows.head(50), data_params)
    with_nan = [{k: math.nan if v is None else v for k, v in r.items()} for r in with_none]
    for scorer in (onnx_scorer, sklearn_scorer):
        np.testing.assert_array_equal(scorer.proba(with_nan), scorer.proba(with_none))


def test_predict_returns_a_label_and_probabilities_per_record_in_order(
    onnx_scorer: Scorer, rows: pd.DataFrame, expected: np.ndarray, data_params: DataParams
) -> None:
    order = expected[:, 1].argsort()
    picked = np.sort(np.r_[order[:10], order[-10:]])  # both labels, in row order
    records = as_records(rows.iloc[picked], data_params)
    forward = onnx_scorer.predict(records)
    backward = onnx_scorer.predict(records[::-1])

    assert backward == forward[::-1]
    assert len(forward) == 20
    for scored, truth in zip(forward, expected[picked], strict=True):
        assert list(scored.probabilities) == onnx_scorer.classes == ["0", "1"]
        assert scored.label == onnx_scorer.classes[int(truth.argmax())]
        np.testing.assert_allclose(list(scored.probabilities.values()), truth, atol=1e-5)
        assert sum(scored.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert {s.label for s in forward} == {"0", "1"}


def test_predict_of_no_records_is_empty(onnx_scorer: Scorer, sklearn_scorer: Scorer) -> None:
    assert onnx_scorer.predict([]) == []
    assert sklearn_scorer.predict([]) == []


def test_a_record_without_a_feature_is_an_error_naming_it(onnx_scorer: Scorer) -> None:
    record = good_record(onnx_scorer)
    del record["age"]
    with pytest.raises(ValueError, match="'age'"):
        onnx_scorer.predict([record])


def test_features_categories_and_classes_come_from_the_model(
    onnx_scorer: Scorer, data_params: DataParams
) -> None:
    assert onnx_scorer.features == [(n, f.type) for n, f in data_params.features.items()]
    assert onnx_scorer.categories == {
        n: sorted(f.categories or []) for n, f in data_params.features.items() if f.categories
    }
    assert onnx_scorer.classes == ["0", "1"]


def test_without_an_onnx_file_the_scorer_falls_back_to_sklearn(
    model_dir: Path, tmp_path: Path
) -> None:
    copy = Path(shutil.copytree(model_dir, tmp_path / "model"))
    (copy / ONNX_ARTIFACT).unlink()
    assert Scorer.load(copy, prefer_onnx=True).backend == "sklearn"


def test_onnx_artifact_is_where_train_logs_it() -> None:
    assert Path("extra_files", train.ONNX_FILE) == ONNX_ARTIFACT


def test_a_directory_without_a_model_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="MLmodel"):
        Scorer.load(tmp_path, prefer_onnx=True)


def test_odd_column_names_and_three_classes_score_by_the_original_names(
    params: Params, tmp_path_factory: pytest.TempPathFactory
) -> None:
    data = DataParams(**PENGUINS)
    small = TrainParams(**(params.train.model_dump() | {"n_estimators": 25}))
    train_df = penguins(1_500, seed=1)
    pipeline = train.build(data, small).fit(model_frame(train_df, data), train_df["species"])
    model_dir = save_model_dir(pipeline, data, train_df, tmp_path_factory.mktemp("p") / "model")
    rows = penguins(300, seed=2)
    records = as_records(rows, data)
    expected = pipeline.predict_proba(model_frame(rows, data))
    columns = {c: model_frame(rows, data)[c].to_numpy() for c in data.feature_names}

    for prefer_onnx, atol in ((True, 1e-5), (False, 1e-12)):
        scorer = Scorer.load(model_dir, prefer_onnx=prefer_onnx)
        assert scorer.backend == ("onnx" if prefer_onnx else "sklearn")
        assert scorer.classes == ["Adelie", "Chinstrap", "Gentoo"]
        assert [name for name, _ in scorer.features] == data.feature_names
        scorer.self_check()
        np.testing.assert_allclose(scorer.proba(records), expected, atol=atol, rtol=0)
        np.testing.assert_allclose(scorer.proba_columns(columns), expected, atol=atol, rtol=0)
        assert {s.label for s in scorer.predict(records)} == set(scorer.classes)


def test_an_onnx_file_without_the_input_mapping_is_fed_by_column_names(
    model_dir: Path, tmp_path: Path, records: list[dict[str, Any]], expected: np.ndarray
) -> None:
    """Models exported before the mapping was recorded keep serving through ONNX."""
    copy = Path(shutil.copytree(model_dir, tmp_path / "model"))
    older = onnx.load(str(copy / ONNX_ARTIFACT))
    del older.metadata_props[:]
    onnx.save(older, str(copy / ONNX_ARTIFACT))

    scorer = Scorer.load(copy, prefer_onnx=True)

    assert scorer.backend == "onnx"
    scorer.self_check()
    np.testing.assert_allclose(scorer.proba(records), expected, atol=1e-5, rtol=0)


# Self-check


def test_self_check_passes_on_a_good_model(onnx_scorer: Scorer, sklearn_scorer: Scorer) -> None:
    onnx_scorer.self_check()
    sklearn_scorer.self_check()


def test_self_check_fails_when_the_onnx_file_belongs_to_another_model(
    model_dir: Path, tmp_path: Path, data_params: DataParams, params: Params
) -> None:
    other = fitted(generate(1_000, seed=9, drift=Drift(concept=1.0)), data_params, params)
    copy = Path(shutil.copytree(model_dir, tmp_path / "model"))
    (copy / ONNX_ARTIFACT).write_bytes(export.export(other, data_params))
    with pytest.raises(ModelError, match="disagree"):
        Scorer.load(copy, prefer_onnx=True).self_check()


def test_self_check_fails_without_an_input_example(model_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(model_dir, tmp_path / "model"))
    (copy / "input_example.json").unlink()
    with pytest.raises(ModelError, match="input example"):
        Scorer.load(copy, prefer_onnx=True).self_check()


# Request validation


@pytest.fixture(scope="module")
def record(onnx_scorer: Scorer) -> type[BaseModel]:
    return record_model(onnx_scorer)


def errors(model: type[BaseModel], payload: dict[str, Any]) -> list[dict[str, Any]]:
    with pytest.raises(ValidationError) as info:
        model.model_validate(payload)
    return [dict(e) for e in info.value.errors()]


def test_record_accepts_explicit_nulls_and_known_values(
    record: type[BaseModel], onnx_scorer: Scorer
) -> None:
    nulls = dict.fromkeys(record.model_fields)
    assert record.model_validate(nulls).model_dump() == nulls
    good = good_record(onnx_scorer) | {"age": 41}
    assert record.model_validate(good).model_dump() == good | {"age": 41.0}


def test_record_rejects_a_missing_field(record: type[BaseModel], onnx_scorer: Scorer) -> None:
    payload = good_record(onnx_scorer)
    del payload["tenure_months"]
    [error] = errors(record, payload)
    assert (error["type"], error["loc"]) == ("missing", ("tenure_months",))


@pytest.mark.parametrize("value", ["12", True, [1.0], {"v": 1}])
def test_record_rejects_a_number_of_the_wrong_type(
    record: type[BaseModel], onnx_scorer: Scorer, value: object
) -> None:
    [error] = errors(record, good_record(onnx_scorer) | {"age": value})
    assert (error["type"], error["loc"]) == ("float_type", ("age",))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_record_rejects_nan_and_infinity(
    record: type[BaseModel], onnx_scorer: Scorer, value: float
) -> None:
    [error] = errors(record, good_record(onnx_scorer) | {"monthly_charges": value})
    assert (error["type"], error["loc"]) == ("finite_number", ("monthly_charges",))


def test_record_rejects_nan_written_in_json(record: type[BaseModel], onnx_scorer: Scorer) -> None:
    body = record.model_validate(good_record(onnx_scorer)).model_dump_json()
    body = body.replace('"age":1.0', '"age":NaN')
    with pytest.raises(ValidationError, match="finite number"):
        record.model_validate_json(body)


def test_record_rejects_an_unseen_category_naming_the_field_and_allowed_values(
    record: type[BaseModel], onnx_scorer: Scorer
) -> None:
    [error] = errors(record, good_record(onnx_scorer) | {"region": "atlantis"})
    assert error["loc"] == ("region",)
    assert all(f"'{c}'" in error["msg"] for c in onnx_scorer.categories["region"])


@pytest.mark.parametrize("value", ["", "__missing__", 3])
def test_record_rejects_categories_the_model_does_not_know(
    record: type[BaseModel], onnx_scorer: Scorer, value: object
) -> None:
    [error] = errors(record, good_record(onnx_scorer) | {"plan_tier": value})
    assert error["loc"] == ("plan_tier",)


def test_record_rejects_an_unknown_field(record: type[BaseModel], onnx_scorer: Scorer) -> None:
    [error] = errors(record, good_record(onnx_scorer) | {"customer_id": "C1"})
    assert (error["type"], error["loc"]) == ("extra_forbidden", ("customer_id",))


def test_record_json_schema_requires_every_feature_and_gives_examples(
    record: type[BaseModel], onnx_scorer: Scorer
) -> None:
    schema = record.model_json_schema()
    names = [name for name, _ in onnx_scorer.features]
    assert schema["title"] == "Record"
    assert schema["required"] == names
    assert schema["additionalProperties"] is False
    assert all(schema["properties"][n]["examples"] for n in names)
    [example] = schema["examples"]
    assert record.model_validate(example).model_dump() == example
    assert schema["properties"]["region"]["anyOf"][0]["enum"] == onnx_scorer.categories["region"]


def test_record_model_builds_from_a_schema_without_a_model() -> None:
    model = record_model(
        Schema(features=(("x", "numeric"), ("c", "categorical")), categories={"c": ("a", "b")})
    )
    assert model.model_validate({"x": 2, "c": "b"}).model_dump() == {"x": 2.0, "c": "b"}
    with pytest.raises(ValidationError):
        model.model_validate({"x": 2, "c": "z"})


AWKWARD = ("_id", "schema", "model_config", "copy", "model_fields", "field_0", "bill length (mm)")
"""Column names pydantic cannot take as field names (or that look like the stand-ins for them)."""


def _awkward_model(**options: Any) -> type[BaseModel]:
    features: tuple[tuple[str, Kind], ...] = (
        *((name, "numeric") for name in AWKWARD),
        ("kind", "categorical"),
    )
    return record_model(
        Schema(features=features, categories={"kind": ("a", "b")}, bounds={"_id": (0, 10)}),
        **options,
    )


@pytest.mark.parametrize("bounded", [True, False])
def test_any_column_name_is_a_request_field(bounded: bool) -> None:
    model = _awkward_model(bounded=bounded)
    record = {name: float(i) for i, name in enumerate(AWKWARD)} | {"kind": "b"}

    assert validate_records(model, record, max_batch=1) == [record]
    assert validate_records(model, [record, record], max_batch=2) == [record, record]
    assert list(model.model_json_schema()["properties"]) == [*AWKWARD, "kind"]
    assert model.model_json_schema()["required"] == [*AWKWARD, "kind"]


def test_an_awkward_column_is_named_in_the_error_and_its_stand_in_is_refused() -> None:
    model = _awkward_model()
    record = {name: 1.0 for name in AWKWARD} | {"kind": "a"}

    with pytest.raises(ValidationError) as info:
        validate_records(model, record | {"_id": 11.0, "schema": "x"}, max_batch=1)
    assert sorted(e["loc"] for e in info.value.errors()) == [("_id",), ("schema",)]
    stand_in = {("field_1" if k == "schema" else k): v for k, v in record.items()}
    with pytest.raises(ValidationError) as info:
        validate_records(model, stand_in, max_batch=1)
    assert sorted((e["type"], e["loc"]) for e in info.value.errors()) == [
        ("extra_forbidden", ("field_1",)),
        ("missing", ("schema",)),
    ]


def test_validated_records_score(record: type[BaseModel], onnx_scorer: Scorer) -> None:
    payload = [good_record(onnx_scorer), dict.fromkeys(record.model_fields)]
    [first, second] = onnx_scorer.predict(validate_records(record, payload, max_batch=10))
    assert first.label in onnx_scorer.classes
    assert second.label in onnx_scorer.classes


def test_validate_records_takes_one_record_or_a_list(
    record: type[BaseModel], onnx_scorer: Scorer
) -> None:
    one = good_record(onnx_scorer)
    assert validate_records(record, one, max_batch=1) == [one]
    assert validate_records(record, [one, one], max_batch=2) == [one, one]


def test_validate_records_locates_errors_by_index_in_a_batch(
    record: type[BaseModel], onnx_scorer: Scorer
) -> None:
    one = good_record(onnx_scorer)
    with pytest.raises(ValidationError) as info:
        validate_records(record, [one, one | {"age": "old"}], max_batch=10)
    assert [e["loc"] for e in info.value.errors()] == [(1, "age")]


def test_validate_records_rejects_an_empty_batch(record: type[BaseModel]) -> None:
    with pytest.raises(ValueError, match="empty"):
        validate_records(record, [], max_batch=10)


def test_validate_records_rejects_an_oversized_batch(
    record: type[BaseModel], onnx_scorer: Scorer
) -> None:
    with pytest.raises(ValueError, match="11 records; at most 10"):
        validate_records(record, [good_record(onnx_scorer)] * 11, max_batch=10)


@pytest.mark.parametrize("payload", ["text", 3, None])
def test_validate_records_rejects_a_payload_that_is_not_records(
    record: type[BaseModel], payload: object
) -> None:
    with pytest.raises(ValueError, match="expected a record"):
        validate_records(record, payload, max_batch=10)


# The data contract logged with the model: declared ranges become request bounds


@pytest.fixture(scope="module")
def bounded_scorer(
    model_dir: Path, data_params: DataParams, tmp_path_factory: pytest.TempPathFactory
) -> Scorer:
    """The module's model with the data contract train.run logs beside it."""
    copy = Path(shutil.copytree(model_dir, tmp_path_factory.mktemp("bounded") / "model"))
    (copy / CONTRACT_ARTIFACT).write_text(json.dumps(train.data_contract(data_params)))
    return Scorer.load(copy, prefer_onnx=True)


def in_range(scorer: Scorer) -> dict[str, Any]:
    low = {name: bounds[0] for name, bounds in scorer.schema.bounds.items()}
    return good_record(scorer) | low


def test_train_logs_the_contract_where_the_scorer_reads_it() -> None:
    assert Path("extra_files", train.CONTRACT_FILE) == CONTRACT_ARTIFACT


def test_scorer_reads_the_declared_ranges_of_numeric_features(
    bounded_scorer: Scorer, data_params: DataParams
) -> None:
    bounds = bounded_scorer.schema.bounds
    assert set(bounds) == set(data_params.numeric)
    assert bounds["age"] == (data_params.features["age"].min, data_params.features["age"].max)


def test_a_model_without_a_contract_has_no_bounds(onnx_scorer: Scorer) -> None:
    assert onnx_scorer.schema.bounds == {}
    record_model(onnx_scorer).model_validate(good_record(onnx_scorer) | {"age": 1e308})


@pytest.mark.parametrize(("field", "value"), [("age", 1e308), ("tenure_months", 10**40)])
def test_record_refuses_a_value_outside_the_declared_range_naming_the_field(
    bounded_scorer: Scorer, field: str, value: float
) -> None:
    model = record_model(bounded_scorer)
    [error] = errors(model, in_range(bounded_scorer) | {field: value})
    assert (error["type"], error["loc"]) == ("less_than_equal", (field,))
    [error] = errors(model, in_range(bounded_scorer) | {field: -1})
    assert (error["type"], error["loc"]) == ("greater_than_equal", (field,))


def test_record_accepts_the_range_ends_and_null(bounded_scorer: Scorer) -> None:
    model = record_model(bounded_scorer)
    high = {name: bounds[1] for name, bounds in bounded_scorer.schema.bounds.items()}
    model.model_validate(in_range(bounded_scorer))
    model.model_validate(in_range(bounded_scorer) | high)
    model.model_validate(in_range(bounded_scorer) | {"age": None})


def test_record_json_schema_shows_the_bounds_and_examples_inside_them(
    bounded_scorer: Scorer,
) -> None:
    schema = record_model(bounded_scorer).model_json_schema()
    number = schema["properties"]["age"]["anyOf"][0]
    assert (number["minimum"], number["maximum"]) == bounded_scorer.schema.bounds["age"]
    [example] = schema["examples"]
    record_model(bounded_scorer).model_validate(example)


def test_unbounded_record_accepts_and_out_of_range_names_each_field(
    bounded_scorer: Scorer,
) -> None:
    model = record_model(bounded_scorer, bounded=False)
    good = in_range(bounded_scorer)
    rows = validate_records(model, [good, good | {"age": 1e308, "num_products": 0}], max_batch=2)
    first, second = out_of_range(bounded_scorer.schema, rows)
    assert first == []
    assert [w.split(":")[0] for w in second] == ["num_products", "age"]
    assert "above the trained maximum 120" in second[1]


def test_a_malformed_contract_is_a_model_error(model_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(model_dir, tmp_path / "model"))
    (copy / CONTRACT_ARTIFACT).write_text('{"features": {"age": {"min": "young"}}}')
    with pytest.raises(ModelError, match="data contract"):
        Scorer.load(copy, prefer_onnx=False)
