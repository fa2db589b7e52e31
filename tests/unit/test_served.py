"""The served-model handle on a real embedded registry: alias -> version -> files -> scorer."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from common import registry
from common.errors import UserError
from common.params import DataParams, Params
from common.registry import tags as tag
from common.registry.served import (
    EXTRA_FILES,
    TAGS_FILE,
    AliasNotFoundError,
    ServedModel,
    by_version,
    from_dir,
    resolve,
)
from common.settings import Settings
from models.manifest import UntrustedModelError
from models.train import HOLDOUT_SCORED_FILE, REFERENCE_FILE
from tests.unit.test_predict import fitted, save_model_dir, sealed, training_rows

NAME = "served-test"


@dataclass(frozen=True)
class Store:
    settings: Settings
    client: MlflowClient
    cache: Path
    versions: dict[str, str]  # onnx.parity tag ("passed", "failed", "none") -> version


@pytest.fixture(scope="module")
def store(
    params: Params, data_params: DataParams, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Store]:
    """An embedded registry (SQLite) with one small model registered three times.

    v1 `champion` passed ONNX parity, v2 `challenger` failed it, v3 carries no parity tag.
    """
    home = tmp_path_factory.mktemp("served")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)  # mlflow exports it; undone after the module
        settings = Settings(MLOPS_HOME=home, MLFLOW_TRACKING_URI=uri)
        client = registry.connect(settings)
        rows = training_rows()
        model_dir = save_model_dir(
            fitted(rows, data_params, params), data_params, rows, home / "model"
        )
        client.create_registered_model(NAME)
        versions: dict[str, str] = {}
        for parity in ("passed", "failed", "none"):
            mv = client.create_model_version(
                NAME, source=model_dir.as_uri(), run_id=None, tags=sealed(model_dir)
            )
            versions[parity] = str(mv.version)
            if parity != "none":
                client.set_model_version_tag(NAME, str(mv.version), tag.ONNX_PARITY, parity)
        client.set_model_version_tag(NAME, versions["passed"], tag.GIT_COMMIT, "abc123")
        client.set_registered_model_alias(NAME, registry.CHAMPION, versions["passed"])
        client.set_registered_model_alias(NAME, registry.CHALLENGER, versions["failed"])
        yield Store(settings, client, home / "cache", versions)


def test_resolves_an_alias_to_its_version_and_downloaded_files(store: Store) -> None:
    model = resolve(store.settings, NAME, registry.CHAMPION, store.cache)
    assert (model.name, model.version, model.alias) == (NAME, store.versions["passed"], "champion")
    assert model.source == "registry"
    assert model.path == store.cache / NAME / store.versions["passed"]
    assert (model.path / "MLmodel").is_file()
    assert model.tags[tag.GIT_COMMIT] == "abc123"
    assert model.lineage == {tag.GIT_COMMIT: "abc123", tag.ONNX_PARITY: "passed"}


def test_resolving_again_reuses_the_downloaded_files(store: Store) -> None:
    first = resolve(store.client, NAME, registry.CHALLENGER, store.cache)
    meta = first.path / "registered_model_meta"  # MLflow's own, outside the manifest
    meta.write_text(meta.read_text() + "# kept\n")
    again = resolve(store.client, NAME, registry.CHALLENGER, store.cache)
    assert again.path == first.path
    assert meta.read_text().endswith("# kept\n")


def test_a_missing_alias_is_a_user_error_naming_it_and_the_tracking_uri(store: Store) -> None:
    with pytest.raises(AliasNotFoundError) as caught:
        resolve(store.client, NAME, "shadow", store.cache)
    message = str(caught.value)
    assert f"models:/{NAME}@shadow does not exist" in message
    assert f"MLFLOW_TRACKING_URI={store.settings.tracking_uri}" in message
    assert "make demo" in message
    assert isinstance(caught.value, UserError)


def test_an_unknown_model_name_is_the_same_user_error(store: Store) -> None:
    with pytest.raises(AliasNotFoundError, match="models:/no-such-model@champion"):
        resolve(store.client, "no-such-model", registry.CHAMPION, store.cache)


def test_a_missing_version_is_a_user_error(store: Store) -> None:
    with pytest.raises(UserError, match=f"models:/{NAME}/99 does not exist"):
        by_version(store.client, NAME, "99", store.cache)


@pytest.mark.parametrize(
    ("parity", "backend"), [("passed", "onnx"), ("failed", "sklearn"), ("none", "sklearn")]
)
def test_serves_onnx_only_when_the_versions_parity_check_passed(
    store: Store, parity: str, backend: str
) -> None:
    model = by_version(store.client, NAME, store.versions[parity], store.cache)
    assert model.prefers_onnx is (parity == "passed")
    assert model.scorer.backend == backend
    assert model.scorer is model.scorer  # loaded once


def test_the_request_model_validates_records_of_the_versions_features(
    store: Store, data_params: DataParams
) -> None:
    model = resolve(store.client, NAME, registry.CHAMPION, store.cache).load()
    assert set(model.record.model_fields) == set(data_params.feature_names)


def test_a_bundled_copy_reads_back_with_its_version_and_tags(store: Store, tmp_path: Path) -> None:
    model = resolve(store.client, NAME, registry.CHAMPION, store.cache)
    bundled = from_dir(model.bundle(tmp_path / "bundle"), NAME, alias="champion")
    assert (bundled.version, bundled.source) == (model.version, "bundled")
    assert bundled.lineage == model.lineage
    assert bundled.scorer.backend == "onnx"


def test_refuses_a_bundle_without_its_tags_file(store: Store, tmp_path: Path) -> None:
    model = resolve(store.client, NAME, registry.CHAMPION, store.cache)
    path = model.bundle(tmp_path / "bundle")
    (path / TAGS_FILE).unlink()  # the manifest's registered SHA-256 went with it
    with pytest.raises(UntrustedModelError, match=r"no model\.manifest_sha256 tag"):
        from_dir(path, NAME)


def test_reference_is_the_snapshot_the_version_logged(store: Store) -> None:
    model = resolve(store.client, NAME, registry.CHAMPION, store.cache)
    logged = pd.read_parquet(model.path / EXTRA_FILES / REFERENCE_FILE)
    pd.testing.assert_frame_equal(model.reference(), logged)


def test_reference_prefers_the_scored_holdout(tmp_path: Path) -> None:
    extra = tmp_path / EXTRA_FILES
    extra.mkdir()
    pd.DataFrame({"a": [1]}).to_parquet(extra / REFERENCE_FILE)
    pd.DataFrame({"b": [2]}).to_parquet(extra / HOLDOUT_SCORED_FILE)
    model = ServedModel(NAME, "4", None, tmp_path)
    assert list(model.reference().columns) == ["b"]


def test_a_version_without_reference_data_says_how_to_get_one(tmp_path: Path) -> None:
    model = ServedModel(NAME, "4", "champion", tmp_path)
    with pytest.raises(UserError) as caught:
        model.reference()
    assert str(caught.value) == (
        f"{NAME} v4 carries no reference data (extra_files/{HOLDOUT_SCORED_FILE}); "
        "retrain it with this project's train stage."
    )


def test_a_version_bundled_into_the_bento_model_store_is_served_from_it(
    store: Store, tmp_path: Path
) -> None:
    import bentoml  # noqa: PLC0415 (only this test needs it)
    from bentoml._internal.models.model import ModelStore  # noqa: PLC0415

    models = ModelStore(str(tmp_path / "models"))  # not the machine's ~/bentoml
    model = resolve(store.client, NAME, registry.CHAMPION, store.cache)
    with bentoml.models.create("trust-bundle", _model_store=models) as stored:
        model.bundle(Path(stored.path))
    path = Path(bentoml.models.get(str(stored.tag), _model_store=models).path)
    assert (path / "model.yaml").is_file()  # BentoML's own file beside the sealed ones
    bundled = from_dir(path, NAME)
    assert bundled.tags[tag.MANIFEST_SHA256] == model.tags[tag.MANIFEST_SHA256]
    assert bundled.scorer.backend == "onnx"
    (path / "extra_files" / "model.onnx").write_bytes(b"swapped")
    with pytest.raises(UntrustedModelError, match=r"extra_files/model\.onnx differs"):
        from_dir(path, NAME)
