"""params.yaml: a broken file is a UserError that names the key to fix."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from common import paths
from common.errors import UserError
from common.params import load_params
from tests.workspace import ROOT

Raw = dict[str, Any]


def _set(keys: str, value: Any) -> Callable[[Raw], None]:
    *parents, last = keys.split(".")

    def edit(raw: Raw) -> None:
        node = raw
        for key in parents:
            node = node[key]
        node[last] = value

    return edit


def _drop(keys: str) -> Callable[[Raw], None]:
    *parents, last = keys.split(".")

    def edit(raw: Raw) -> None:
        node = raw
        for key in parents:
            node = node[key]
        del node[last]

    return edit


def write_params(tmp_path: Path, edit: Callable[[Raw], None]) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_the_repository_params_load() -> None:
    params = load_params(ROOT / "params.yaml")
    assert params.data.target not in params.data.features
    assert params.validate_.min_rows >= 1
    assert set(params.promote.improve) <= {"roc_auc", "f1_macro", "accuracy", "log_loss"}


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (_set("train.n_estimators", "many"), "train.n_estimators"),
        (_set("train.learning_rate", -0.1), "train.learning_rate"),
        (_set("train.n_estimator", 10), "train.n_estimator"),
        (_set("validate.min_rows", 0), "validate.min_rows"),
        (_set("promote.improve", {"auc": 0.1}), "promote.improve.auc"),
        (_set("prepare.holdout_share", 1.5), "prepare.holdout_share"),
        (_set("data.features.age.type", "number"), "data.features.age.type"),
        (_set("data.features.region.min", 0), "data.features.region"),
        (_set("data.features.age.max_missing_share", 2), "data.features.age.max_missing_share"),
        (_drop("data.target"), "data.target"),
        (_drop("prepare"), "prepare"),
        (_set("generate.tenant_sources", {"acme": 0}), "generate.tenant_sources.acme"),
        (
            _set("tenants.acme.source", {"path": "a.csv", "sql": "SELECT 1", "url_env": "X"}),
            "tenants.acme.source",
        ),
        (_set("tenants.acme.source", {"sql": "SELECT 1"}), "tenants.acme.source"),
        (_set("tenants.acme.train", {"n_estimators": 0}), "tenants.acme: train.n_estimators"),
    ],
    ids=[
        "text-for-a-number",
        "negative-learning-rate",
        "misspelt-key",
        "zero-min-rows",
        "unknown-metric",
        "share-over-one",
        "unknown-feature-type",
        "bounds-on-a-category",
        "missing-share-over-one",
        "no-target",
        "no-prepare-section",
        "no-rows-for-an-example-tenant",
        "a-path-and-a-query",
        "a-query-without-url-env",
        "a-tenants-bad-override",
    ],
)
def test_broken_params_name_the_key(edit: Callable[[Raw], None], key: str, tmp_path: Path) -> None:
    path = write_params(tmp_path, edit)
    with pytest.raises(UserError) as err:
        load_params(path)
    message = str(err.value)
    assert message.startswith(f"{path} is invalid: ")
    assert f"{key}:" in message
    assert "\n" not in message


def test_invalid_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  n_estimators: [1, 2\n")
    with pytest.raises(UserError, match="is not valid YAML") as err:
        load_params(path)
    assert str(path) in str(err.value)


def test_missing_params_file_says_where_to_run_from(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="repository root"):
        load_params(tmp_path / "params.yaml")


def test_a_tenants_params_are_the_shared_ones_over_its_own_files_and_overrides(
    tmp_path: Path,
) -> None:
    path = write_params(tmp_path, _set("tenants.acme.train", {"n_estimators": 7}))
    params = load_params(path)

    acme = params.for_tenant("acme")

    assert acme.data.path == str(paths.layout("acme").SNAPSHOT)
    assert acme.data.production_dir == str(paths.layout("acme").PRODUCTION)
    assert acme.data.production_tenants == ["acme"]
    assert acme.train.n_estimators == 7
    assert acme.train.learning_rate == params.train.learning_rate
    assert acme.data.features == params.data.features
    assert params.for_tenant(None) is params


def test_a_tenants_files_are_under_its_own_folders() -> None:
    acme = paths.layout("acme")
    files = [acme.SNAPSHOT, acme.TRAIN, acme.VALIDATION_REPORT, acme.METRICS, acme.ROC]
    assert all("tenants/acme" in str(f) for f in files)
    assert not {f.parts for f in files} & {f.parts for f in (paths.TRAIN, paths.METRICS)}


def test_a_tenant_without_a_model_of_its_own_is_served_by_the_shared_one() -> None:
    params = load_params(ROOT / "params.yaml")
    assert params.model_owner("acme") == "acme"
    assert params.model_owner("globex") is None
    assert params.model_owner(None) is None
