"""The register stage's gate with params.yaml `rollout.canary`: a passing version becomes the
rollout flow's `challenger`, not `champion`; a model's first version is champion at once.

On a real (embedded) MLflow registry, the register stage run for real, as in
test_promotion.py (whose fixture and stage runner these reuse).
"""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from common import registry
from common.params import Params
from tests.unit.test_promotion import NAME, _register, client  # noqa: F401  (the fixture)

pytestmark = pytest.mark.unit


def canary(params: Params) -> Params:
    return params.model_copy(update={"rollout": params.rollout.model_copy(update={"canary": True})})


def _alias(client: MlflowClient, alias: str) -> str | None:  # noqa: F811  (the fixture's name)
    found = registry.version_by_alias(client, NAME, alias)
    return None if found is None else str(found.version)


def test_a_passing_version_becomes_the_challenger_with_the_gates_evidence(
    client: MlflowClient,  # noqa: F811
    params: Params,
) -> None:
    first = _register(canary(params), 0.80)
    second = _register(canary(params), 0.85)

    assert (first.promoted, first.canary) == (True, False)  # the first: champion at once
    assert (second.promoted, second.canary) == (False, True)
    assert _alias(client, registry.CHAMPION) == first.version
    assert _alias(client, registry.CHALLENGER) == second.version
    tags = dict(client.get_model_version(NAME, second.version).tags)
    assert tags["gate.decision"] == "canary"
    assert "canary: challenger for the rollout flow" in tags["alias.challenger.reason"]
    evidence = json.loads(tags["alias.challenger.evidence"])
    assert evidence["challenger"]["metrics"]["roc_auc"] == 0.85
    assert evidence["champion"]["version"] == first.version
    assert "promote.decision" not in tags  # the rollout decides
    assert "alias.champion.previous" not in tags


def test_a_failing_version_is_still_rejected_with_canary_on(
    client: MlflowClient,  # noqa: F811
    params: Params,
) -> None:
    first = _register(canary(params), 0.80)
    worse = _register(canary(params), 0.70)

    assert (worse.promoted, worse.canary) == (False, False)
    assert _alias(client, registry.CHAMPION) == first.version
    tags = dict(client.get_model_version(NAME, worse.version).tags)
    assert (tags["gate.decision"], tags["promote.decision"]) == ("rejected", "rejected")


def test_without_canary_a_passing_version_is_promoted_as_before(
    client: MlflowClient,  # noqa: F811
    params: Params,
) -> None:
    assert params.rollout.canary is False  # the repository's default
    _register(params, 0.80)
    second = _register(params, 0.85)
    assert (second.promoted, second.canary) == (True, False)
    assert _alias(client, registry.CHAMPION) == second.version
