"""The one promotion path: every move of `champion` records the same things, and rollback
works after any of them, on a real (embedded) MLflow registry.

The register stage runs for real against it (registering, tagging, gating); only the
champion's scoring on the holdout is replaced by fixed metrics, so the tests are about the
moves and the tags. The promote flow's path is in test_flows.py (it needs Prefect).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from common import paths, registry
from common.errors import UserError
from common.params import Params
from common.registry import promotion
from common.settings import get_settings
from models import manifest, register

pytestmark = pytest.mark.unit

NAME = "churn-classifier"
ACME = f"{NAME}.acme"
PREVIOUS = "alias.champion.previous"  # the stored string rollback has always read
METRICS: dict[tuple[str, str], dict[str, float]] = {}
"""(registered model, version) -> its holdout metrics, what the gate's champion scores."""


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MlflowClient]:
    """An empty embedded registry under a project dir the register stage runs in."""
    monkeypatch.setenv("MLOPS_HOME", str(tmp_path / ".mlops"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # another test in this process may have left an active experiment of its own store
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    monkeypatch.setenv("MODEL_NAME", NAME)
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()

    def champion_metrics(
        client: MlflowClient, name: str, *_: object
    ) -> tuple[str | None, dict[str, float] | None, str | None]:
        current = registry.version_by_alias(client, name, registry.CHAMPION)
        if current is None:
            return None, None, None
        return str(current.version), METRICS[(name, str(current.version))], None

    monkeypatch.setattr(register, "_champion_metrics", champion_metrics)
    yield registry.connect(get_settings())
    get_settings.cache_clear()


def _register(params: Params, roc_auc: float, tenant: str | None = None) -> register.Decision:
    """One run of the register stage: a trained run's files, then the real stage."""
    where = paths.layout(tenant)
    for path in (where.TRAIN_RUN, where.METRICS, where.HOLDOUT):
        path.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame({"x": [1, 2]})
    frame.to_parquet(where.TRAIN)
    frame.to_parquet(where.HOLDOUT)
    with mlflow.start_run() as run:
        model = Path(f"model-{run.info.run_id}")
        model.mkdir()
        (model / "MLmodel").write_text("flavors: {}\n")
        sealed = manifest.write(model)  # as train.run seals what it logged
    metrics = {"roc_auc": roc_auc, "log_loss": 0.4, "rows": 2}
    where.METRICS.write_text(json.dumps(metrics))
    where.TRAIN_RUN.write_text(
        json.dumps(
            {
                "run_id": run.info.run_id,
                "model_uri": model.resolve().as_uri(),
                "onnx_parity": True,
                "onnx_max_abs_diff": 0.0,
                "manifest_sha256": sealed,
            }
        )
    )
    decision = register.run(params, get_settings(), where)
    METRICS[(decision.model_name, decision.version)] = {"roc_auc": roc_auc, "log_loss": 0.4}
    return decision


def _champion(client: MlflowClient, name: str = NAME) -> str:
    return str(client.get_model_version_by_alias(name, registry.CHAMPION).version)


def _tags(client: MlflowClient, version: str, name: str = NAME) -> dict[str, str]:
    return dict(client.get_model_version(name, version).tags)


def _rollback(client: MlflowClient, name: str = NAME) -> promotion.Move:
    return promotion.rollback(client, name, by="test", reason="bad live numbers")


def test_the_gate_promotes_through_the_one_path_recording_the_champion_it_replaced(
    client: MlflowClient, params: Params
) -> None:
    first = _register(params, 0.80)
    second = _register(params, 0.85)

    assert (first.promoted, second.promoted) == (True, True)
    assert _champion(client) == second.version
    tags = _tags(client, second.version)
    assert tags[PREVIOUS] == first.version
    assert tags["gate.decision"] == "promoted"  # the gate's verdict, as before
    assert tags["promote.decision"] == "promoted"
    by = "register stage (dvc repro)"
    assert tags["promote.decided_by"] == tags["alias.champion.set_by"] == by
    assert tags["promote.decided_at"] == tags["alias.champion.set_at"]
    assert tags["promote.reason"] == tags["alias.champion.reason"] == second.reason
    evidence = json.loads(tags["alias.champion.evidence"])
    assert evidence["challenger"]["metrics"]["roc_auc"] == 0.85
    assert evidence["champion"] == {
        "model": NAME,
        "version": first.version,
        "metrics": {"roc_auc": 0.80, "log_loss": 0.4},
    }
    assert evidence["policy"]["improve"] == params.promote.improve
    assert PREVIOUS not in _tags(client, first.version)  # the first champion replaced none
    assert registry.version_by_alias(client, NAME, registry.CHALLENGER) is None


def test_a_rejected_version_is_recorded_and_moves_nothing(
    client: MlflowClient, params: Params
) -> None:
    first = _register(params, 0.80)
    worse = _register(params, 0.70)

    assert not worse.promoted
    assert _champion(client) == first.version
    tags = _tags(client, worse.version)
    assert (tags["gate.decision"], tags["promote.decision"]) == ("rejected", "rejected")
    assert PREVIOUS not in tags


def test_rollback_after_the_gate_returns_to_the_champion_it_replaced(
    client: MlflowClient, params: Params
) -> None:
    first = _register(params, 0.80)
    second = _register(params, 0.85)

    move = _rollback(client)

    assert (move.replaced, move.version, move.rollback) == (second.version, first.version, True)
    assert _champion(client) == first.version
    left, back = _tags(client, second.version), _tags(client, first.version)
    assert left["promote.decision"] == "rolled back"
    assert left["promote.reason"] == "bad live numbers"
    assert back["promote.decision"] == "restored"
    assert back["alias.champion.set_by"] == "test"
    assert back["alias.champion.reason"] == "bad live numbers"
    assert json.loads(back["alias.champion.evidence"]) == {"rolled_back_from": second.version}
    assert "v2 -> v1 (rollback by test" in move.describe()


def test_a_second_rollback_walks_further_back_until_the_first_champion(
    client: MlflowClient, params: Params
) -> None:
    v1, v2, v3 = (_register(params, auc).version for auc in (0.80, 0.85, 0.90))

    assert _rollback(client).version == v2
    assert _tags(client, v2)[PREVIOUS] == v1  # kept: the chain still leads back
    assert _rollback(client).version == v1
    assert _champion(client) == v1
    with pytest.raises(UserError, match="no earlier champion to return to"):
        _rollback(client)
    assert _champion(client) == v1
    assert _tags(client, v3)["promote.decision"] == "rolled back"
    assert _tags(client, v2)["promote.decision"] == "rolled back"


def test_a_promotion_after_a_rollback_replaces_the_restored_champion(
    client: MlflowClient, params: Params
) -> None:
    v1, _ = (_register(params, auc).version for auc in (0.80, 0.85))
    _rollback(client)
    v3 = _register(params, 0.90).version

    assert _champion(client) == v3
    assert _tags(client, v3)[PREVIOUS] == v1
    assert _rollback(client).version == v1


def test_rollback_without_a_champion_or_an_earlier_one_says_so(
    client: MlflowClient, params: Params
) -> None:
    client.create_registered_model(NAME)
    with pytest.raises(UserError, match="has no 'champion': nothing to roll back"):
        _rollback(client)
    first = _register(params, 0.80)
    with pytest.raises(UserError, match=f"{NAME} v{first.version} has no {PREVIOUS} tag"):
        _rollback(client)


def test_rollback_to_a_deleted_version_is_refused_and_moves_nothing(
    client: MlflowClient, params: Params
) -> None:
    first = _register(params, 0.80)
    second = _register(params, 0.85)
    client.delete_model_version(NAME, first.version)

    with pytest.raises(UserError, match=f"previous champion v{first.version} no longer exists"):
        _rollback(client)
    assert _champion(client) == second.version


def test_a_tenants_model_moves_through_the_same_path_and_rolls_back_on_its_own(
    client: MlflowClient, params: Params
) -> None:
    shared = _register(params, 0.80)
    first = _register(params, 0.85, tenant="acme")  # beats the shared champion on acme's data
    second = _register(params, 0.90, tenant="acme")

    assert (first.model_name, first.promoted, second.promoted) == (ACME, True, True)
    evidence = json.loads(_tags(client, first.version, ACME)["alias.champion.evidence"])
    assert evidence["champion"]["model"] == NAME  # gated against the shared champion ...
    assert PREVIOUS not in _tags(client, first.version, ACME)  # ... which it did not replace
    assert _tags(client, second.version, ACME)[PREVIOUS] == first.version

    assert _rollback(client, ACME).version == first.version
    assert _champion(client, ACME) == first.version
    assert _champion(client) == shared.version  # the shared model did not move
    with pytest.raises(UserError, match="no earlier champion"):
        _rollback(client, ACME)


def test_evidence_too_long_for_a_tag_is_cut_to_what_mlflow_stores(
    client: MlflowClient, params: Params
) -> None:
    first = _register(params, 0.80)
    move = promotion.move_champion(
        client, NAME, first.version, by="test", reason="x" * 6000, evidence={"n": "y" * 6000}
    )

    tags = _tags(client, move.version)
    assert len(tags["alias.champion.evidence"]) == promotion.TAG_LIMIT
    assert len(tags["promote.reason"]) == promotion.TAG_LIMIT
