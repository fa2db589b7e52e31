"""A rollout's moves in the registry: the variants it ramps, its steps, and how it ends.

The rollout flow (flows/rollout.py) calls one of these per task. A rollout ends one way of
three, each recorded on the challenger version:
- `promote`: champion moves through the one promotion path (`promotion.move_champion`, the
  live numbers as evidence), then the challenger's weight goes back to 0;
- `roll_back`: weight 0, the `challenger` alias removed, `promote.decision: rolled back`;
  the champion never moved;
- `hold` (no verdict within a step's timeout): weight 0, the alias kept, `promote.decision:
  held`, so a later rollout can try again.
The predictor sees each within one alias poll: weight and aliases are in its one search.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from common.errors import UserError
from common.registry import CHALLENGER, CHAMPION, set_tags, variants, version_by_alias
from common.registry import tags as tag
from common.registry.promotion import (
    HELD,
    PROMOTED,
    REJECTED,
    ROLLED_BACK,
    Move,
    move_champion,
    now,
    record_decision,
    shorten,
)


def candidates(client: MlflowClient, name: str) -> tuple[ModelVersion, ModelVersion]:
    """(champion, challenger) of `name`; a UserError naming what is missing."""
    challenger = version_by_alias(client, name, CHALLENGER)
    if challenger is None:
        raise UserError(
            f"{name} has no '{CHALLENGER}' alias: nothing to roll out. Register a version "
            "with params.yaml rollout.canary: true, or point the alias at one "
            f"(MlflowClient().set_registered_model_alias('{name}', '{CHALLENGER}', <version>))."
        )
    champion = version_by_alias(client, name, CHAMPION)
    if champion is None:
        raise UserError(
            f"{name} has no '{CHAMPION}' to compare v{challenger.version} with: promote it "
            "directly instead (python -m flows.promote, or the register stage's gate)."
        )
    if str(champion.version) == str(challenger.version):
        raise UserError(f"{name} v{champion.version} is both champion and challenger.")
    if challenger.tags.get(tag.PROMOTE_DECISION) == REJECTED:
        # the register stage points `challenger` at every new version, passing or not
        raise UserError(
            f"{name} v{challenger.version} (challenger) was rejected: "
            f"{challenger.tags.get(tag.PROMOTE_REASON, 'no reason recorded')}. Point "
            f"'{CHALLENGER}' at a version that passed, or delete v{challenger.version}'s "
            f"{tag.PROMOTE_DECISION} tag to roll it out anyway."
        )
    return champion, challenger


def set_weight(client: MlflowClient, name: str, weight: float, *, by: str, reason: str) -> None:
    """The challenger's share of traffic, now (registered-model tag, recorded who and why)."""
    variants.set_weight(client, name, weight, by=by, reason=reason, at=now())


def record_step(
    client: MlflowClient, name: str, version: str, step: int, record: Mapping[str, Any]
) -> None:
    """`rollout.step.<step>` on the challenger: what that step saw and decided (JSON)."""
    set_tags(
        client,
        name,
        version,
        {tag.rollout_step_tag(step): shorten(json.dumps(dict(record), default=str))},
    )


def promote(
    client: MlflowClient,
    name: str,
    version: str,
    *,
    champion: str,
    by: str,
    reason: str,
    evidence: Mapping[str, Any],
) -> Move:
    """The challenger becomes champion (the one promotion path), then its weight goes to 0:
    every request is the champion's again, and the champion is this version."""
    move = move_champion(client, name, version, by=by, reason=reason, evidence=evidence)
    set_tags(
        client,
        name,
        version,
        {tag.ROLLOUT_OUTCOME: PROMOTED, tag.ROLLOUT_CHAMPION: champion},
    )
    variants.set_weight(client, name, 0, by=by, reason=f"promoted v{version}", at=move.at)
    return move


def _end(
    client: MlflowClient,
    name: str,
    version: str,
    *,
    champion: str,
    decision: str,
    by: str,
    reason: str,
    drop_alias: bool,
) -> None:
    at = now()
    variants.set_weight(client, name, 0, by=by, reason=f"{decision} v{version}: {reason}", at=at)
    current = version_by_alias(client, name, CHALLENGER)
    if drop_alias and current is not None and str(current.version) == version:
        client.delete_registered_model_alias(name, CHALLENGER)
    set_tags(client, name, version, {tag.ROLLOUT_OUTCOME: decision, tag.ROLLOUT_CHAMPION: champion})
    record_decision(client, name, version, decision=decision, by=by, reason=reason, at=at)


def roll_back(
    client: MlflowClient, name: str, version: str, *, champion: str, by: str, reason: str
) -> None:
    """The canary is over: weight 0, `challenger` removed, `rolled back` recorded on it."""
    _end(
        client,
        name,
        version,
        champion=champion,
        decision=ROLLED_BACK,
        by=by,
        reason=reason,
        drop_alias=True,
    )


def hold(
    client: MlflowClient, name: str, version: str, *, champion: str, by: str, reason: str
) -> None:
    """No verdict in time: weight 0, `challenger` kept for a later rollout, `held` recorded."""
    _end(
        client,
        name,
        version,
        champion=champion,
        decision=HELD,
        by=by,
        reason=reason,
        drop_alias=False,
    )
