"""Variants of a served model: sticky assignment by entity key; the runtime following the
`challenger` and `shadow` aliases and the challenger's weight from its one registry search
(a real embedded registry on SQLite); the predictor's shadow queue."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from common import registry
from common.params import DataParams, Params
from common.registry import variants
from common.registry.runtime import ModelRuntime
from common.settings import Settings
from common.store import Item, Prediction, ServingError, from_line, to_line
from services.predictor.shadow import Shadow
from services.worker.worker import Models
from tests.unit.test_predict import as_records, fitted, save_model_dir, sealed, training_rows

KEYS = [f"customer-{i}" for i in range(20_000)]
SHARED = "variants-test"
AT = "2026-12-02T00:00:00+00:00"


def share(tenant: str, weight: float) -> float:
    return sum(variants.assign(tenant, k, weight) == "challenger" for k in KEYS) / len(KEYS)


def test_ten_percent_of_twenty_thousand_entity_keys_go_to_the_challenger() -> None:
    for tenant in ("default", "acme"):
        assert abs(share(tenant, 10) - 0.10) <= 0.0064, tenant


def test_an_entity_key_always_gets_the_same_variant() -> None:
    first = {k: variants.assign("acme", k, 10) for k in KEYS[:2000]}
    for _ in range(5):
        assert {k: variants.assign("acme", k, 10) for k in KEYS[:2000]} == first


def test_raising_the_weight_only_moves_keys_from_champion_to_challenger() -> None:
    before = {k: variants.assign("acme", k, 10) for k in KEYS}
    for weight in (25, 50, 100):
        after = {k: variants.assign("acme", k, weight) for k in KEYS}
        assert all(after[k] == "challenger" for k in KEYS if before[k] == "challenger"), weight
        before = after


def test_weight_zero_sends_no_key_and_a_hundred_every_key_to_the_challenger() -> None:
    assert share("acme", 0) == 0
    assert share("acme", 100) == 1
    assert share("acme", -5) == 0
    assert share("acme", 250) == 1


def test_the_weight_tag_reads_as_a_percentage_and_nonsense_as_zero() -> None:
    assert variants.weight_of({variants.WEIGHT_TAG: "12.5"}) == 12.5
    assert variants.weight_of({variants.WEIGHT_TAG: "lots"}) == 0
    assert variants.weight_of({variants.WEIGHT_TAG: "140"}) == 100
    assert variants.weight_of({}) == 0


def test_a_serving_error_round_trips_through_a_spill_line() -> None:
    error = ServingError.of(
        RuntimeError("boom\x00"),
        tenant_id="acme",
        model_name="m",
        model_version="2",
        variant="challenger",
        ts=datetime.now(UTC),
    )
    assert error.error == "RuntimeError: boom"
    assert from_line(to_line(error)) == error
    with pytest.raises(ValueError, match="variant"):
        ServingError(str(uuid.uuid4()), datetime.now(UTC), "a", "m", "1", "canary", "x")


# -- the runtime -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(
    params: Params, data_params: DataParams, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Settings, MlflowClient]]:
    """The shared model v1..v3 (champion v1) and acme's own v1..v2 (champion v1)."""
    home = tmp_path_factory.mktemp("variants")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        settings = Settings(MLOPS_HOME=home, MLFLOW_TRACKING_URI=uri, MODEL_NAME=SHARED)
        client = registry.connect(settings)
        rows = training_rows()
        model_dir = save_model_dir(
            fitted(rows, data_params, params), data_params, rows, home / "model"
        )
        source = model_dir.as_uri()
        for name, count in ((SHARED, 3), (registry.model_name(settings, "acme"), 2)):
            client.create_registered_model(name)
            for _ in range(count):
                client.create_model_version(name, source, None, tags=sealed(model_dir))
            client.set_registered_model_alias(name, registry.CHAMPION, "1")
        yield settings, client


@pytest.fixture
def runtime(store: tuple[Settings, MlflowClient]) -> Iterator[ModelRuntime]:
    settings, client = store
    yield ModelRuntime(settings)
    for name in (SHARED, registry.model_name(settings, "acme")):
        for alias in (registry.CHALLENGER, variants.SHADOW):
            client.delete_registered_model_alias(name, alias)
        variants.set_weight(client, name, 0, by="test", reason="reset", at=AT)


def test_the_runtime_follows_challenger_weight_and_shadow_and_drops_them_when_gone(
    runtime: ModelRuntime, store: tuple[Settings, MlflowClient]
) -> None:
    _, client = store
    assert runtime.select("umbrella", "k").variant == "champion"
    client.set_registered_model_alias(SHARED, registry.CHALLENGER, "2")
    client.set_registered_model_alias(SHARED, variants.SHADOW, "3")
    variants.set_weight(client, SHARED, 100, by="test", reason="all of it", at=AT)
    assert runtime.check_now() is True
    choice = runtime.select("umbrella", "k")
    assert (choice.variant, choice.model.version, choice.champion.version) == (
        "challenger",
        "2",
        "1",
    )
    assert choice.shadow is not None
    assert choice.shadow.version == "3"
    about = runtime.describe("umbrella")["variants"]
    assert about["challenger"]["model_version"] == "2"
    assert about["challenger_weight"] == 100
    assert about["shadow"]["model_version"] == "3"

    variants.set_weight(client, SHARED, 0, by="test", reason="roll back", at=AT)
    client.delete_registered_model_alias(SHARED, registry.CHALLENGER)
    client.delete_registered_model_alias(SHARED, variants.SHADOW)
    runtime.check_now()
    choice = runtime.select("umbrella", "k")
    assert (choice.variant, choice.model.version, choice.shadow) == ("champion", "1", None)
    assert runtime.describe("umbrella")["variants"]["challenger"] is None


def test_a_tenant_with_its_own_model_follows_its_own_models_variants(
    runtime: ModelRuntime, store: tuple[Settings, MlflowClient]
) -> None:
    settings, client = store
    own = registry.model_name(settings, "acme")
    client.set_registered_model_alias(SHARED, registry.CHALLENGER, "2")
    variants.set_weight(client, SHARED, 100, by="test", reason="shared only", at=AT)
    runtime.check_now()
    choice = runtime.select("acme", "k")
    assert (choice.variant, choice.model.name) == ("champion", own)

    client.set_registered_model_alias(own, registry.CHALLENGER, "2")
    variants.set_weight(client, own, 100, by="test", reason="acme's", at=AT)
    runtime.check_now()
    choice = runtime.select("acme", "k")
    assert (choice.variant, choice.model.name, choice.model.version) == ("challenger", own, "2")
    assert runtime.select("umbrella", "k").model.name == SHARED


def test_a_challenger_that_cannot_load_never_serves(
    runtime: ModelRuntime, store: tuple[Settings, MlflowClient], tmp_path: Path
) -> None:
    _, client = store
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "MLmodel").write_text("not a model\n")
    version = client.create_model_version(SHARED, source=broken.as_uri(), run_id=None).version
    client.set_registered_model_alias(SHARED, registry.CHALLENGER, str(version))
    variants.set_weight(client, SHARED, 100, by="test", reason="broken", at=AT)
    runtime.check_now()
    assert runtime.select("umbrella", "k").variant == "champion"
    assert runtime.describe()["variants"]["challenger"]["serving"] is False


def test_a_workers_runtime_loads_neither_challenger_nor_shadow(
    runtime: ModelRuntime, store: tuple[Settings, MlflowClient]
) -> None:
    settings, client = store
    client.set_registered_model_alias(SHARED, registry.CHALLENGER, "2")
    client.set_registered_model_alias(SHARED, variants.SHADOW, "3")
    variants.set_weight(client, SHARED, 100, by="test", reason="all of it", at=AT)
    runtime.check_now()
    assert runtime.select("umbrella", "k").variant == "challenger"  # the predictor's does
    models = Models(settings)
    try:
        worker = models.start()
        worker.check_now()
        assert worker.variants == {}
        choice = worker.select("umbrella", "k")
        assert (choice.variant, choice.model.version, choice.shadow) == ("champion", "1", None)
    finally:
        models.stop()


# -- the shadow ------------------------------------------------------------------------------


def test_the_shadow_logs_its_own_rows_and_drops_what_it_falls_behind_on(
    runtime: ModelRuntime, data_params: DataParams
) -> None:
    rows = as_records(training_rows().head(50), data_params)
    logged: list[Item] = []
    shadow = Shadow(logged.append, size=1)
    offered = [shadow.offer("acme", runtime.current, rows) for _ in range(200)]
    shadow.close(timeout=60)
    assert shadow.dropped == offered.count(False) > 0
    predictions = [i for i in logged if isinstance(i, Prediction)]
    assert len(predictions) == offered.count(True) * len(rows)
    assert {(p.variant, p.tenant_id, p.model_version) for p in predictions} == {
        ("shadow", "acme", "1")
    }
    assert len({p.request_id for p in predictions}) == len(predictions)


def test_a_shadow_that_fails_to_score_leaves_a_serving_error(runtime: ModelRuntime) -> None:
    logged: list[Item] = []
    shadow = Shadow(logged.append)
    assert shadow.offer("acme", runtime.current, [{"not_a_feature": 1}])
    shadow.close(timeout=60)
    (error,) = logged
    assert isinstance(error, ServingError)
    assert (error.variant, error.tenant_id, error.model_version) == ("shadow", "acme", "1")


def test_one_failing_copy_in_a_batch_fails_alone(
    runtime: ModelRuntime, data_params: DataParams
) -> None:
    rows = as_records(training_rows().head(3), data_params)
    logged: list[Item] = []
    shadow = Shadow(logged.append)
    copies = [rows, [{"not_a_feature": 1}], rows]
    for _ in range(50):
        for copy in copies:
            shadow.offer("acme", runtime.current, copy)
    shadow.close(timeout=60)
    assert sum(isinstance(i, ServingError) for i in logged) == 50
    assert sum(isinstance(i, Prediction) for i in logged) == 50 * 2 * len(rows)
