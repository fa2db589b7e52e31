"""Tenants' own models in the predictor's runtime, on a real embedded registry (SQLite).

A tenant with a `<MODEL_NAME>.<tenant>@champion` is served it, loaded on first use and
kept in a bounded cache (least recently used out); any other tenant gets the shared
champion. One registry search per check follows every alias.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from pydantic import ValidationError

from common import registry
from common.params import DataParams, Params
from common.registry.runtime import ModelCache, ModelRuntime, ModelUnavailableError
from common.registry.served import ServedModel
from common.settings import Settings
from models.predict import validate_records
from tests.unit.test_predict import fitted, save_model_dir, sealed, training_rows

SHARED = "tenant-test"
OWN = ("acme", "globex", "initech")
SLIMMED = "plan_tier"


@dataclass(frozen=True)
class Registry:
    settings: Settings
    client: MlflowClient
    source: str


def _model(name: str, version: str) -> ServedModel:
    return ServedModel(name, version, "champion", Path("/nowhere"))


@pytest.fixture(scope="module")
def store(
    params: Params, data_params: DataParams, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Registry]:
    """The shared model v1..v2 (champion v1), and acme, globex, initech each with v1..v2 of
    their own (champion v1); `umbrella` has no model of its own; `slim`'s model was
    trained without `plan_tier`."""
    home = tmp_path_factory.mktemp("tenants")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)  # mlflow exports it; undone after the module
        settings = Settings(
            MLOPS_HOME=home, MLFLOW_TRACKING_URI=uri, MODEL_NAME=SHARED, MODEL_CACHE_SIZE=2
        )
        client = registry.connect(settings)
        rows = training_rows()
        model_dir = save_model_dir(
            fitted(rows, data_params, params), data_params, rows, home / "model"
        )
        source = model_dir.as_uri()
        client.create_registered_model("tenant-test-other")  # a look-alike name: not a tenant's
        for name in [SHARED, *(registry.model_name(settings, t) for t in OWN)]:
            client.create_registered_model(name)
            for _ in range(2):
                client.create_model_version(name, source, None, tags=sealed(model_dir))
            client.set_registered_model_alias(name, registry.CHAMPION, "1")
        slim = data_params.model_copy(
            update={"features": {k: v for k, v in data_params.features.items() if k != SLIMMED}}
        )
        slim_dir = save_model_dir(fitted(rows, slim, params), slim, rows, home / "slim-model")
        client.create_registered_model(registry.model_name(settings, "slim"))
        client.create_model_version(
            registry.model_name(settings, "slim"), slim_dir.as_uri(), None, tags=sealed(slim_dir)
        )
        client.set_registered_model_alias(registry.model_name(settings, "slim"), "champion", "1")
        yield Registry(settings, client, source)


@pytest.fixture
def runtime(store: Registry) -> Iterator[ModelRuntime]:
    rt = ModelRuntime(store.settings)
    yield rt
    for name in [SHARED, *(registry.model_name(store.settings, t) for t in OWN)]:
        store.client.set_registered_model_alias(name, registry.CHAMPION, "1")


def test_the_cache_drops_the_least_recently_used_model_past_its_size() -> None:
    cache = ModelCache(2)
    assert cache.put("a", _model("m.a", "1")) == []
    assert cache.put("b", _model("m.b", "1")) == []
    assert cache.get("a") is not None  # a is now more recent than b
    assert cache.put("c", _model("m.c", "1")) == ["b"]
    assert cache.peek("b") is None
    assert [t for t, _ in cache.items()] == ["a", "c"]
    assert cache.evictions == 1


def test_replacing_a_cached_model_keeps_its_place_and_only_if_it_is_still_there() -> None:
    cache = ModelCache(2)
    old, new = _model("m.a", "1"), _model("m.a", "2")
    cache.put("a", old)
    cache.put("b", _model("m.b", "1"))
    assert cache.replace("a", old, new)
    assert not cache.replace("a", old, _model("m.a", "3"))
    assert [(t, m.version) for t, m in cache.items()] == [("a", "2"), ("b", "1")]


def test_a_tenant_without_its_own_model_gets_the_shared_champion(runtime: ModelRuntime) -> None:
    served = runtime.serving("umbrella")
    assert (served.name, served.version) == (SHARED, "1")
    assert runtime.describe("umbrella")["own_model"] is False
    assert len(runtime.models) == 0


def test_a_tenant_with_its_own_model_is_served_it_loaded_on_first_use(
    runtime: ModelRuntime,
) -> None:
    assert runtime.ready("acme") is None  # known to have one, not loaded yet
    assert runtime.describe("acme")["model_version"] == "1"
    served = runtime.serving("acme")
    assert (served.name, served.version) == (f"{SHARED}.acme", "1")
    assert runtime.ready("acme") is served
    assert runtime.describe("acme")["cache"]["tenant_models_loaded"] == 1


def test_a_look_alike_model_name_is_no_tenants_model(runtime: ModelRuntime) -> None:
    assert set(runtime.own) == {*OWN, "slim"}


def test_request_validation_follows_the_tenants_own_model(
    runtime: ModelRuntime, data_params: DataParams
) -> None:
    record = {
        str(k): (None if pd.isna(v) else v)
        for k, v in training_rows()[data_params.feature_names].iloc[0].items()
    }
    del record[SLIMMED]
    validate_records(runtime.serving("slim").record, record, max_batch=10)
    with pytest.raises(ValidationError, match=SLIMMED):
        validate_records(runtime.serving("umbrella").record, record, max_batch=10)


def test_the_runtime_evicts_the_least_recently_used_tenant_past_the_cache_size(
    runtime: ModelRuntime,
) -> None:
    runtime.serving("acme")
    runtime.serving("globex")
    runtime.serving("acme")
    runtime.serving("initech")  # size 2: globex is the least recently used
    assert {t for t, _ in runtime.models.items()} == {"acme", "initech"}
    again = runtime.serving("globex")  # loaded again on its next request
    assert again.version == "1"
    assert runtime.models.evictions == 2


def test_moving_one_tenants_alias_swaps_only_its_model(
    store: Registry, runtime: ModelRuntime
) -> None:
    acme, globex = runtime.serving("acme"), runtime.serving("globex")
    store.client.set_registered_model_alias(f"{SHARED}.acme", registry.CHAMPION, "2")
    assert runtime.check_now() is True
    assert runtime.serving("acme").version == "2"
    assert runtime.serving("globex") is globex
    assert runtime.current.version == "1"
    assert acme.version == "1"  # a request holding the old one finishes with it


def test_a_moved_alias_of_a_tenant_not_loaded_is_loaded_at_its_new_version(
    store: Registry, runtime: ModelRuntime
) -> None:
    store.client.set_registered_model_alias(f"{SHARED}.initech", registry.CHAMPION, "2")
    runtime.check_now()
    assert runtime.serving("initech").version == "2"


def test_every_check_is_one_registry_search(
    runtime: ModelRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = runtime._registry()
    calls: list[str] = []
    search = client.search_registered_models

    def counted(*args: object, **kwargs: object) -> object:
        calls.append("search")
        return search(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(client, "search_registered_models", counted)
    for tenant in OWN:
        runtime.serving(tenant)
    calls.clear()
    runtime.check_now()
    assert calls == ["search"]


def test_a_tenant_whose_alias_is_removed_falls_back_to_the_shared_model(
    store: Registry, runtime: ModelRuntime
) -> None:
    runtime.serving("acme")
    store.client.delete_registered_model_alias(f"{SHARED}.acme", registry.CHAMPION)
    runtime.check_now()
    assert runtime.serving("acme") is runtime.current


def test_an_own_model_that_cannot_be_loaded_is_unavailable_not_the_shared_one(
    store: Registry, runtime: ModelRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(name: str, version: str) -> ServedModel:
        raise OSError("artifact store away")

    monkeypatch.setattr(runtime, "_fetch", broken)
    with pytest.raises(ModelUnavailableError, match=rf"{SHARED}\.globex v1"):
        runtime.serving("globex")
