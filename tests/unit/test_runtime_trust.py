"""The predictor's runtime refuses an unsealed or tampered version and keeps the model it has,
on a real embedded registry (SQLite)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from common import registry
from common.params import DataParams, Params
from common.registry import served
from common.registry.runtime import ModelRuntime, ModelUnavailableError
from common.settings import Settings
from models.manifest import UntrustedModelError
from tests.unit.test_predict import fitted, save_model_dir, sealed, training_rows

SHARED = "trust-test"


@dataclass(frozen=True)
class Store:
    settings: Settings
    client: MlflowClient
    versions: dict[str, str]


@pytest.fixture(scope="module")
def store(
    params: Params, data_params: DataParams, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Store]:
    """v1 sealed (champion); v2 registered without the manifest tag (as before sealing);
    v3 sealed, then a file changed; v4 sealed, its files not (yet) in the artifact store;
    acme's own model: only a tampered v1."""
    home = tmp_path_factory.mktemp("trust")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        settings = Settings(MLOPS_HOME=home, MLFLOW_TRACKING_URI=uri, MODEL_NAME=SHARED)
        client = registry.connect(settings)
        rows = training_rows()
        good = save_model_dir(fitted(rows, data_params, params), data_params, rows, home / "m")
        bad = home / "tampered"
        shutil.copytree(good, bad)
        (bad / "extra_files" / "reference.parquet").write_bytes(b"not the reference")
        (home / "missing").mkdir()
        client.create_registered_model(SHARED)
        versions = {
            "sealed": client.create_model_version(SHARED, good.as_uri(), None, tags=sealed(good)),
            "unsealed": client.create_model_version(SHARED, good.as_uri(), None),
            "tampered": client.create_model_version(SHARED, bad.as_uri(), None, tags=sealed(good)),
            "missing": client.create_model_version(
                SHARED, (home / "missing").as_uri(), None, tags=sealed(good)
            ),
        }
        client.set_registered_model_alias(SHARED, registry.CHAMPION, "1")
        acme = registry.model_name(settings, "acme")
        client.create_registered_model(acme)
        client.create_model_version(acme, bad.as_uri(), None, tags=sealed(good))
        client.set_registered_model_alias(acme, registry.CHAMPION, "1")
        yield Store(settings, client, {k: str(v.version) for k, v in versions.items()})


@pytest.fixture
def runtime(store: Store) -> Iterator[ModelRuntime]:
    rt = ModelRuntime(store.settings, follow_variants=False)
    yield rt
    store.client.set_registered_model_alias(SHARED, registry.CHAMPION, "1")


@pytest.mark.parametrize(
    ("which", "why"),
    [
        ("unsealed", "has no model.manifest_sha256 tag"),
        ("tampered", "file extra_files/reference.parquet differs from the one registered"),
    ],
)
def test_keeps_serving_its_model_when_the_champion_moves_to_a_refused_version(
    runtime: ModelRuntime, store: Store, which: str, why: str
) -> None:
    version = store.versions[which]
    store.client.set_registered_model_alias(SHARED, registry.CHAMPION, version)
    assert runtime.check_now() is False
    assert runtime.current.version == store.versions["sealed"]
    about = runtime.describe()
    assert about["model_version"] == store.versions["sealed"]
    uri = f"models:/{SHARED}/{version}"
    assert why in about["refused"][uri]
    assert about["registry"]["reachable"] is True
    assert runtime.check_now() is False  # not tried again
    assert runtime.swaps == 0


def test_a_version_whose_files_cannot_be_had_is_tried_again_not_refused(
    runtime: ModelRuntime, store: Store
) -> None:
    """MLflow's artifact proxy lists nothing while its S3 is down: no verdict on the model."""
    version = store.versions["missing"]
    store.client.set_registered_model_alias(SHARED, registry.CHAMPION, version)
    assert runtime.check_now() is False
    assert runtime.current.version == store.versions["sealed"]
    assert runtime.describe()["refused"] == {}
    assert "returned no MLmodel file" in (runtime.last_error or "")
    assert not (runtime.cache / SHARED / version).exists()
    shutil.copytree(
        store.settings.mlops_home / "m", store.settings.mlops_home / "missing", dirs_exist_ok=True
    )
    assert runtime.check_now() is True  # the store has the files now: loaded
    assert runtime.current.version == version


def test_a_tenants_refused_model_is_a_serving_error_shown_only_to_that_tenant(
    runtime: ModelRuntime, store: Store
) -> None:
    with pytest.raises(ModelUnavailableError, match=r"differs from the one registered"):
        runtime.serving("acme")
    acme = registry.model_name(store.settings, "acme")
    assert f"models:/{acme}/1" in runtime.describe("acme")["refused"]
    assert runtime.describe()["refused"] == {}
    assert runtime.describe("umbrella")["refused"] == {}


def test_starts_on_no_model_rather_than_a_refused_one(store: Store, tmp_path: Path) -> None:
    store.client.set_registered_model_alias(SHARED, registry.CHAMPION, store.versions["tampered"])
    try:
        with pytest.raises(RuntimeError, match="differs from the one registered"):
            ModelRuntime(store.settings.model_copy(update={"mlops_home": tmp_path}))
    finally:
        store.client.set_registered_model_alias(SHARED, registry.CHAMPION, "1")


def test_a_cached_copy_of_another_stores_same_numbered_version_is_downloaded_again(
    store: Store, tmp_path: Path
) -> None:
    """After MLFLOW_TRACKING_URI changes, `<name>/1` in the cache is the old store's v1:
    it is replaced by this store's files, not refused, and a tampered version still is."""
    cache = tmp_path / "cache"
    stale = cache / SHARED / store.versions["sealed"]
    shutil.copytree(store.settings.mlops_home / "m", stale)  # the sealed files, then changed
    (stale / "extra_files" / "reference.parquet").write_bytes(b"another store's v1")
    model = served.by_version(store.client, SHARED, store.versions["sealed"], cache)
    assert model.path == stale
    assert (stale / "extra_files" / "reference.parquet").read_bytes() != b"another store's v1"
    stale = cache / SHARED / store.versions["tampered"]
    shutil.copytree(store.settings.mlops_home / "m", stale)
    (stale / "extra_files" / "reference.parquet").write_bytes(b"another store's v3")
    with pytest.raises(UntrustedModelError, match="differs from the one registered"):
        served.by_version(store.client, SHARED, store.versions["tampered"], cache)
